"""The training entry point end to end: tiny OPT/LLaMA/RoBERTa, 1 and 2 ranks, real launchers."""

import csv
import glob
import json
import re
import shutil
import string
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from cli_runs import NEGATIVE, POSITIVE, read_metrics, train_command
from launch import run
from helpers.tiny import save_tiny_pretrained

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rows = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows * 4))
    # 55 evaluation sentences: an odd count, so picking the least likely candidate changes any accuracy
    adjectives = {"great": 1, "wonderful": 1, "fine": 1, "moving": 1, "best": 1,
                  "dull": 0, "boring": 0, "terrible": 0, "bad": 0, "worst": 0, "slow": 0}
    dev = [(f"the {a} {n}", y) for a, y in adjectives.items() for n in ("film", "story", "movie", "acting", "plot")]
    (root / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in dev))
    squad = [{"title": "Films", "context": f"The film was {w}. It ran for two hours.", "question": "How was the film?",
              "answers": {"text": [w], "answer_start": [13]}} for w in ["great", "bad", "long", "fine"]]
    (root / "squad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in squad * 4))
    texts = POSITIVE + NEGATIVE + ["It was great terrible", "Title: Context: Question: Answer:"] * 5
    for arch in ("opt", "llama", "roberta"):
        save_tiny_pretrained(root / arch, arch, texts)
    return root


def read_tsv(path):
    with open(path, newline="") as handle:
        return [(row["sentence"], int(row["label"])) for row in csv.DictReader(handle, delimiter="\t")]


def load_final_model(output, base):
    """The trained model as a user loads it: from_pretrained, or peft's adapter on the base model."""
    model_class = AutoModelForMaskedLM if is_masked(base) else AutoModelForCausalLM
    if (output / "final" / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(model_class.from_pretrained(base), output / "final").eval()
    return model_class.from_pretrained(output / "final").eval()


def is_masked(base):
    return AutoConfig.from_pretrained(base).model_type == "roberta"


def sst2_scores(model, tokenizer, sentences, masked, offset=None):
    """By hand: per sentence, the mean log-likelihood of " terrible" and " great" after "<sentence> It was"
    (a masked LM: the label word's log-probability at the mask). ``offset``: how many positions the
    logits have before the input's (prompt tuning's virtual tokens); None: as many as they have more."""
    scores = []
    with torch.no_grad():
        for sentence in sentences:
            prompt = f"{sentence} It was"
            if masked:
                ids = tokenizer(prompt + tokenizer.mask_token)["input_ids"]
                logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
                at = ids.index(tokenizer.mask_token_id)
                words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" terrible", " great")]
                scores.append([logits[at, w[0]].item() for w in words])
                continue
            prompt_ids = tokenizer(prompt)["input_ids"]
            row = []
            for candidate in (" terrible", " great"):
                answer = tokenizer(candidate, add_special_tokens=False)["input_ids"]
                ids = prompt_ids + answer
                logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
                shift = logits.shape[0] - len(ids) if offset is None else offset
                row.append(sum(logits[shift + len(prompt_ids) + j - 1, t].item() for j, t in enumerate(answer)) / len(answer))
            scores.append(row)
    return scores


def hand_accuracy(model, tokenizer, examples, masked, offset=None):
    scores = sst2_scores(model, tokenizer, [sentence for sentence, _ in examples], masked, offset)
    return sum(max((0, 1), key=lambda c: row[c]) == label for row, (_, label) in zip(scores, examples)) / len(examples)


def last_batch_classification_loss(workspace, output, model, masked, offset=None, steps=12, batch=2):
    """By hand: the 2-way cross-entropy of ``model`` (the saved θ after the last step) on the last step's batch.

    The CLI logs (ℓ+ + ℓ−)/2 at θ_{last−1} ± εD on that batch: the same loss up to O(ε²) and one
    update of lr·g·D (measured: 3e-5 prompt tuning, 1.7e-3 RoBERTa at lr 1e-4).
    """
    from subzero_ds.tasks import get_task, load_samples
    from subzero_ds.train import TaskBatches

    samples = load_samples(get_task("sst2"), "train", file=workspace / "train.tsv", limit=1000, seed=0)
    chosen = TaskBatches(samples, batch, seed=0).at(steps - 1)
    tokenizer = AutoTokenizer.from_pretrained(output / "final")
    scores = torch.tensor(sst2_scores(model, tokenizer, [s.prompt.removesuffix(" It was") for s in chosen], masked, offset))
    return torch.nn.functional.cross_entropy(scores, torch.tensor([s.gold for s in chosen])).item()


def assert_complete_outputs(output, base, validation):
    """metrics.jsonl and eval_results.json are complete, and the accuracies reported are those of the
    base model (zero-shot) and of the saved model (final), scored by hand on ``validation``."""
    rows = read_metrics(output)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [4, 8, 12]
    for r in train_rows:
        assert r["projected_grad"] == pytest.approx((r["loss_pos"] - r["loss_neg"]) / 2e-3, rel=1e-6)
        assert r["tokens_per_second"] > 0 and r["seconds_per_step"] > 0
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    results = json.loads((output / "eval_results.json").read_text())
    examples = read_tsv(validation)
    assert results["num_eval"] == len(examples)
    tokenizer = AutoTokenizer.from_pretrained(output / "final")
    masked = is_masked(base)
    model_class = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    zero_shot = hand_accuracy(model_class.from_pretrained(base).eval(), tokenizer, examples, masked)
    final = hand_accuracy(load_final_model(output, base), tokenizer, examples, masked)
    assert results["zero_shot"]["accuracy"] == evals[0]["eval_accuracy"] == pytest.approx(zero_shot, abs=1e-9)
    assert results["final"]["accuracy"] == evals[-1]["eval_accuracy"] == pytest.approx(final, abs=1e-9)
    return results


@pytest.mark.parametrize("arch", ["llama"])  # OPT: the mpirun test below, and 1 ≡ 2 ranks in test_equivalence.py
def test_one_and_two_ranks_train_the_same_model(workspace, tmp_path, arch):
    """--train_as_classification averages over examples, so 1 rank × 4 ≡ 2 ranks × 2 (deepspeed launcher)."""
    one, two = tmp_path / "one", tmp_path / "two"
    finished = run("python", 1, *train_command(workspace, arch, one, "--train_as_classification",
                                                 "--per_device_batch_size", "4"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    finished = run("deepspeed", 2, *train_command(workspace, arch, two, "--train_as_classification"))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert "zero-shot accuracy" in finished.stdout and "final accuracy" in finished.stdout
    results = [assert_complete_outputs(out, workspace / arch, workspace / "dev.tsv") for out in (one, two)]
    assert results[0]["final"] == results[1]["final"] and results[1]["world_size"] == 2
    weights = [load_file(out / "final" / "model.safetensors") for out in (one, two)]
    initial = AutoModelForCausalLM.from_pretrained(workspace / arch).state_dict()
    assert max((weights[0][k] - initial[k]).abs().max().item() for k in weights[0]) > 1e-4  # it trained
    for name, tensor in weights[0].items():
        assert (weights[1][name] - tensor).abs().max().item() <= 1e-5, name
    loaded = AutoModelForCausalLM.from_pretrained(two / "final")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights[1].items())


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed (apt-get install openmpi-bin; "
                                                           "scripts/setup.sh installs it)")
def test_mpirun_trains_opt_with_the_lm_loss(workspace, tmp_path):
    finished = run("mpirun", 2, *train_command(workspace, "opt", tmp_path))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert_complete_outputs(tmp_path, workspace / "opt", workspace / "dev.tsv")


def test_masked_lm_trains_as_classification_and_feeds_deepspeed_monitors(workspace, tmp_path):
    """RoBERTa: the logged loss is the 2-way cross-entropy of the label words at the mask (≈ ln 2 here,
    where an MLM loss over the vocabulary would be ≈ 6), the weights move, and the CSV monitor holds
    every metrics.jsonl value."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
        "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "run"},
        "subzero": {"lr": 1e-4, "eps": 1e-3, "rank": 4}}))
    output = tmp_path / "out"
    finished = run("python", 1, *train_command(workspace, "roberta", output, "--deepspeed_config", str(config)))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_complete_outputs(output, workspace / "roberta", workspace / "dev.tsv")

    final = load_final_model(output, workspace / "roberta")
    initial = AutoModelForMaskedLM.from_pretrained(workspace / "roberta").state_dict()
    assert max((v - initial[k]).abs().max().item() for k, v in final.state_dict().items()) > 1e-5  # it trained
    logged = read_metrics(output)
    by_hand = last_batch_classification_loss(workspace, output, final, masked=True)
    assert [r for r in logged if "loss" in r][-1]["loss"] == pytest.approx(by_hand, abs=1e-2)

    for key in ("loss", "loss_pos", "projected_grad", "eval_accuracy", "tokens_per_second"):
        with open(tmp_path / "csv" / "run" / f"subzero_{key}.csv", newline="") as handle:
            got = [(int(step), float(value)) for step, value in list(csv.reader(handle))[1:]]
        assert got == [(r["step"], pytest.approx(float(r[key]), rel=1e-12)) for r in logged if key in r], key


def test_squad_is_evaluated_with_generation_f1(workspace, tmp_path):
    finished = run("python", 1, "-m", "subzero_ds.train", "--model_name_or_path", str(workspace / "llama"),
                   "--task", "squad", "--train_file", str(workspace / "squad.jsonl"),
                   "--validation_file", str(workspace / "squad.jsonl"), "--num_eval", "4", "--max_steps", "3",
                   "--log_steps", "1", "--max_new_tokens", "4", "--output_dir", str(tmp_path))
    assert finished.returncode == 0, finished.stderr[-3000:]
    final = json.loads((tmp_path / "eval_results.json").read_text())["final"]
    assert set(final) == {"f1", "exact_match"} and 0 <= final["exact_match"] <= final["f1"] <= 1


def normalized_tokens(text):
    """SQuAD/DROP answer normalization, written here: lowercase, no ASCII punctuation, no a/an/the, words."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def expected_f1_em(prediction, golds):
    """Best token F1 and exact match of ``prediction`` over ``golds``, by hand."""
    predicted = normalized_tokens(prediction)
    f1s = []
    for gold in golds:
        tokens = normalized_tokens(gold)
        common = sum((Counter(predicted) & Counter(tokens)).values())
        f1s.append(float(predicted == tokens) if not predicted or not tokens else
                   0.0 if common == 0 else 2 * common / (len(predicted) + len(tokens)))
    return max(f1s), float(any(normalized_tokens(g) == predicted for g in golds))


def test_drop_is_scored_by_token_f1_and_exact_match_of_the_greedy_answers(workspace, tmp_path):
    """--task drop end to end (official DROP JSON, lr 0 so the weights stay put): the F1 and EM the CLI
    reports are those of the model's greedy answers against the gold answers, computed here by hand.

    The gold answers are built from the model's own greedy answers (subzero_ds.tasks.evaluation.greedy_generate
    on the same prompts) so that the scores are neither all 0 nor all 1: exact, the same up to case and
    punctuation, one extra word, several spans, a number, and wrong.
    """
    from subzero_ds.tasks.encoding import SampleEncoder
    from subzero_ds.tasks.evaluation import greedy_generate

    tokenizer = AutoTokenizer.from_pretrained(workspace / "llama")
    model = AutoModelForCausalLM.from_pretrained(workspace / "llama").eval()
    question = "How long did the film run?"
    passages = [f"The {w} film ran for {n} hours." for w in ("great", "fine", "bad", "long", "dull", "best")
                for n in ("two", "three")]
    prompts = [f"Passage: {p}\nQuestion: {question}\nAnswer:" for p in passages]
    predictions = [greedy_generate(model, SampleEncoder(tokenizer, 256), [prompt], 4)[0] for prompt in prompts]
    assert all(normalized_tokens(p) for p in predictions), predictions  # every answer has words to score
    variants = [  # (answer fields of the official JSON, the gold strings they stand for)
        lambda p: ({"spans": [p]}, [p]),
        lambda p: ({"spans": [p.upper() + "."]}, [p.upper() + "."]),
        lambda p: ({"spans": [f"the {p} hours"]}, [f"the {p} hours"]),
        lambda p: ({"spans": ["zebra"], "validated": [f"{p} hours"]}, ["zebra", f"{p} hours"]),
        lambda p: ({"number": "2"}, ["2"]),
        lambda p: ({"spans": ["zebra crossing"]}, ["zebra crossing"]),
    ]
    document, expected = {}, []
    for index, (passage, prediction) in enumerate(zip(passages, predictions)):
        fields, golds = variants[index % len(variants)](prediction)
        answer = {"number": fields.get("number", ""), "date": {"day": "", "month": "", "year": ""},
                  "spans": fields.get("spans", [])}
        validated = [{"number": "", "date": {}, "spans": [v]} for v in fields.get("validated", [])]
        document[f"film_{index}"] = {"passage": passage, "qa_pairs": [
            {"query_id": str(index), "question": question, "answer": answer, "validated_answers": validated}]}
        expected.append(expected_f1_em(prediction, golds))
    data = tmp_path / "drop_dataset_dev.json"
    data.write_text(json.dumps(document))
    f1, em = (sum(column) / len(expected) for column in zip(*expected))
    assert 0 < em < f1 < 1, (em, f1)  # measured: EM 0.33, F1 0.58
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "subzero": {"lr": 0.0, "eps": 1e-3, "rank": 4}}))
    finished = run("python", 1, "-m", "subzero_ds.train", "--model_name_or_path", str(workspace / "llama"),
                   "--task", "drop", "--train_file", str(data), "--validation_file", str(data), "--num_eval", "0",
                   "--max_steps", "1", "--per_device_batch_size", "2", "--eval_batch_size", "1",
                   "--max_new_tokens", "4", "--deepspeed_config", str(config), "--output_dir", str(tmp_path / "out"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["num_eval"] == len(passages)
    for scores in (results["zero_shot"], results["final"]):
        assert scores["f1"] == pytest.approx(f1, abs=1e-9) and scores["exact_match"] == pytest.approx(em, abs=1e-9)


def test_lora_on_two_ranks_saves_a_peft_adapter_and_a_merged_model(workspace, tmp_path):
    """Also: the launched ranks leave none of DeepSpeed's shared-memory allreduce buffers behind."""
    from peft import PeftModel

    shared_memory = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    finished = run("deepspeed", 2, *train_command(workspace, "llama", tmp_path, "--tuning", "lora",
                                                    "--merge_adapter", "--train_as_classification"))
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    assert set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= shared_memory
    assert_complete_outputs(tmp_path, workspace / "llama", workspace / "dev.tsv")
    final = tmp_path / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "llama"), final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    ids = AutoTokenizer.from_pretrained(final / "merged")("a great and moving film", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(workspace / "llama").eval()
        assert not torch.allclose(base(ids).logits, adapted(ids).logits, atol=1e-6)  # the adapter trained


def test_prompt_tuning_scores_candidates_after_the_virtual_tokens(workspace, tmp_path):
    """Training and evaluation read each candidate's logits 10 positions (the virtual tokens) after the
    input's: the logged classification loss and the accuracies are those of the saved adapter scored by
    hand that way; read at the input's own positions, the loss differs by far more than the tolerance.
    (Accuracy alone may not tell: on 44 such sentences both readings gave 0.545.)"""
    finished = run("python", 1, *train_command(workspace, "opt", tmp_path, "--tuning", "prompt",
                                                 "--train_as_classification"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = assert_complete_outputs(tmp_path, workspace / "opt", workspace / "dev.tsv")
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["num_virtual_tokens"] == 10
    model, examples = load_final_model(tmp_path, workspace / "opt"), read_tsv(workspace / "dev.tsv")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert results["final"]["accuracy"] == pytest.approx(hand_accuracy(model, tokenizer, examples, False, offset=10))
    logged = [r for r in read_metrics(tmp_path) if "loss" in r][-1]["loss"]
    after = last_batch_classification_loss(workspace, tmp_path, model, False, offset=10)
    ignored = last_batch_classification_loss(workspace, tmp_path, model, False, offset=0)
    assert logged == pytest.approx(after, abs=5e-3)  # measured gap 3e-5
    assert abs(logged - ignored) > 4 * 5e-3  # measured 0.12: the check tells the two readings apart
