"""Two real processes over gloo: uneven shards, or fewer shards than (rank, worker) slots, must still give both
ranks the same number of batches.

Each rank does one all_reduce per batch, like a training step; a rank with more batches would wait in its
extra all_reduce, which the short process-group timeout turns into a failure within seconds, not a hang.
"""

import importlib.util
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shards.stream import SequenceStream
from shards.stream_config import StreamConfig

pytestmark = pytest.mark.dist


def _fixtures():
    # the synthetic-domain writer lives with the shards tests; load it by path (tests are not a package)
    path = Path(__file__).parents[1] / "shards" / "conftest.py"
    spec = importlib.util.spec_from_file_location("shards_test_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, folders: list[str], out: str, workers: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        cfg = StreamConfig(batch_size=3, num_workers=workers, shuffle_buffer=8, image_size=16, max_text_len=16)
        stream = SequenceStream(folders, cfg)  # rank and world size from the process group
        steps, users = 0, []
        for batch in stream:
            total = torch.ones(1)
            dist.all_reduce(total)  # a training step's gradient all-reduce
            assert total.item() == world
            steps += 1
            users += list(zip(batch.user_domain.tolist(), batch.user_index.tolist()))
        dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "len": len(stream), "users": users}))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("layout", "workers"),
    [({"books": [7, 3, 11], "films": [5, 9]}, 1), ({"single": [37]}, 2)],  # 5 shards; 1 shard for 4 slots
)
def test_two_ranks_finish_together(tmp_path: Path, layout: dict[str, list[int]], workers: int) -> None:
    fixtures = _fixtures()
    domains = [fixtures.write_domain(tmp_path / name, sizes, seed=i) for i, (name, sizes) in enumerate(layout.items())]
    folders = [str(d.folder) for d in domains]
    # fork: the ranks inherit the imported torch and transformers (spawn re-imports them: 3x slower here)
    args = (2, _free_port(), folders, str(tmp_path), workers)
    mp.start_processes(_rank_main, args=args, nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = sum(d.n_samples for d in domains)
    assert results[0]["steps"] == results[1]["steps"] == results[0]["len"] == total // (3 * 2)
    seen = [tuple(u) for r in results for u in r["users"]]
    assert len(seen) == len(set(seen)) == total - total % (3 * 2)  # only the last partial global batch is left out
