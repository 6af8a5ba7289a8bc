"""What the benchmarks in bench/ share; each script there measures one claim and reports it.

- ``models``: the model shapes the benchmarks build with random weights, and random token batches;
- ``methods``: the ZO methods a benchmark can run, from the package's registry;
- ``steps``: (model, dtype, method, mode) configurations of a step, each measured in fresh workers
  (``step_worker``: what such a worker does) and summarized across ranks;
- ``workers``: starting a fresh worker per rank and collecting every rank's result; timing, exit;
- ``collectives``: counting the bytes collectives move (tests/distributed/test_gather_count.py uses it too);
- ``load``: the load guard (how much of the CPU other processes used while we measured);
- ``netns``: two "nodes" on one machine (network namespaces joined by a veth pair) and shaping the link between them;
  ``link_worker``: a rank of bench/hpz_link.py on them;
- ``report``: Markdown helpers, and publishing a report.

Scripts in bench/ import it as ``harness`` (their own directory is on ``sys.path``); the tests find
it through the path tests/conftest.py adds.
"""
