"""Speed and memory benchmarks of every stage, each run from the repository root as ``python -m benchmarks.<name>``.

- ``stream``: shard build and streaming speed, next to plain PIL decoding;
- ``step``: a training step with and without item deduplication, its FLOP/s, ZeRO memory per rank, ``--profile``;
- ``zero_memory``: per-rank memory of each ZeRO stage (also part of ``step``);
- ``feature_cache``: what the disk feature cache gives a process that encodes the catalog;
- ``finetune_modes``: the finetuning modes' step times side by side;
- ``gpu_report``: the GPU check's report (run by ``launch/gpu_check.sh``).

Benchmarks import the packages; nothing in the packages imports them.
"""
