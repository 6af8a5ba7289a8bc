"""DeepSpeed ZeRO mechanics: this rank's shards of the trainable parameters, NVMe swapping, write ordering."""
