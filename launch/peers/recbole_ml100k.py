"""RecBole on MovieLens-100K with the split and metrics momrec uses: the peer check of momrec's SASRec baseline.

Runs in its own environment (RecBole pins old numpy/ray APIs and is not a momrec dependency): launch/peers/recbole.sh
makes it and calls this file. The protocol matches ``python -m pretrain.evaluate`` on shards built from the same
``ml-100k.inter``: leave-one-out by time (RecBole ``LS valid_and_test``, ``order TO``, stable sort: ties keep file
order, as momrec's builder; the timestamps are given as their dense ranks, see :func:`dataset_folder`), full ranking
of every item, the user's history masked, HR/NDCG/MRR at 1/5/10/20/50, and the test metrics of the best-validation
epoch. The dataset is named ``movielens-100k``: under the name ``ml-100k`` RecBole reads its own bundled copy.

Two models:

* ``Pop``: RecBole 1.2.1's Pop counts an item once per batch however often it occurs in it (``item_cnt[item] += 1``
  with repeated indices; RecBole issues #1844 and #2198), so its scores depend on the batch size. It is patched
  here to count every interaction (``scatter_add_``, the fix of RecBole PR #2199); ``--keep-pop-bug`` runs it as
  shipped. With the fix it is the same ranker as momrec's popularity floor: a check of the split and the metrics.
* ``SASRec``: RecBole's defaults (2 layers, 2 heads, width 64, dropout 0.5, 50 positions, full-softmax CE over every
  prefix of every training sequence).

The best epoch's weights are kept in memory rather than in RecBole's pickled checkpoint (which ``torch.load`` would
have to unpickle to test it). Writes ``--out`` (JSON: settings, the validation curve, best epoch, test metrics).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# RecBole 1.2.1 imports ray 2.6 (its tuner), written for numpy 1: alias the names numpy 2 removed
for _name, _value in {"bool8": np.bool_, "float_": np.float64, "complex_": np.complex128, "unicode_": np.str_,
                      "NaN": np.nan, "Inf": np.inf, "float": float, "int": int, "bool": bool}.items():  # fmt: skip
    if _name not in np.__dict__:
        setattr(np, _name, _value)

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.general_recommender.pop import Pop  # noqa: E402
from recbole.utils import get_model, get_trainer, init_logger, init_seed  # noqa: E402

KS = [1, 5, 10, 20, 50]


def pop_loss_counting_every_interaction(self: Pop, interaction):  # RecBole PR #2199
    item = interaction[self.ITEM_ID]
    self.item_cnt.scatter_add_(0, item.unsqueeze(1), torch.ones_like(item, dtype=self.item_cnt.dtype).unsqueeze(1))
    self.max_cnt = torch.max(self.item_cnt, dim=0)[0]
    return torch.nn.Parameter(torch.zeros(1)).to(self.device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inter", required=True, type=Path, help="ml-100k.inter (RecBole atomic file)")
    p.add_argument("--model", choices=["SASRec", "Pop"], default="SASRec")
    p.add_argument("--epochs", type=int, default=200, help="at most this many epochs")
    p.add_argument("--stopping-step", type=int, default=10, help="stop after this many epochs without a better "
                   "validation NDCG@10 (RecBole's stopping_step)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=2048, help="training batch (RecBole's default 2048)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--keep-pop-bug", action="store_true", help="run RecBole's Pop as shipped (see above)")
    p.add_argument("--raw-timestamps", action="store_true", help="give RecBole the raw timestamps, which it ties "
                   "in float32 (see dataset_folder); by default they become their exact dense ranks")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=Path("runs/peers/recbole"), help="RecBole's data and log folder")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    p.add_argument("--momrec", type=Path, help="a `python -m pretrain.evaluate --out` JSON of the same split: print "
                   "its numbers beside RecBole's (its popularity floor beside Pop)")  # fmt: skip
    return p.parse_args(argv)


DATASET = "movielens-100k"
"""RecBole's name for the dataset: not 'ml-100k', for which RecBole 1.2.1 silently reads its bundled copy instead
of data_path (Config._set_default_parameters)."""


def dataset_folder(inter: Path, workdir: Path, raw_timestamps: bool) -> Path:
    """``workdir/DATASET/DATASET.inter`` (RecBole reads ``data_path/<name>/<name>.inter``): a link to ``inter``
    with ``raw_timestamps``; else a copy whose timestamps are replaced by their dense rank (equal times keep equal
    ranks). RecBole holds timestamps as float32, whose spacing near ML-100K's 8.9e8 s is 64 s (and about 1 s after
    its min-max normalisation), so the raw column ties interactions that are seconds apart; ranks up to 1e5 are
    exact in float32, and the order, ties included, is the one momrec sorts by."""
    if not inter.is_file():
        raise SystemExit(f"error: {inter}: no such file (the RecBole atomic file ml-100k.inter)")
    folder = workdir / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{DATASET}.inter"
    if out.is_symlink() or out.exists():
        out.unlink()
    if raw_timestamps:
        out.symlink_to(inter.resolve())
        return workdir
    lines = inter.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    if "timestamp:float" not in header:
        raise SystemExit(f"error: {inter}:1: no 'timestamp:float' column in the header {header}")
    col = header.index("timestamp:float")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    rank = {t: r for r, t in enumerate(sorted({float(row[col]) for row in rows}))}
    for row in rows:
        row[col] = str(rank[float(row[col])])
    out.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return workdir


def metric_names(split: str, result: dict[str, float]) -> dict[str, float]:
    """RecBole's ``hit@10`` / ``ndcg@10`` / ``mrr@10`` under momrec's names (``test/full/hr@10``, ...)."""
    return {f"{split}/full/{k.replace('hit@', 'hr@')}": float(v) for k, v in result.items()}


def side_by_side(peer: dict, momrec: dict, path: Path) -> str:
    """A markdown table of RecBole's and momrec's test metrics at 10 and 20 (momrec's ``pop`` ones for Pop)."""
    keys = [f"test/full/{m}@{k}" for k in (10, 20) for m in ("ndcg", "hr", "mrr")]
    theirs = momrec["metrics"]
    mine = {k: theirs[k.replace("/full/", "/full/pop/")] if peer["model"] == "Pop" else theirs[k] for k in keys}
    rows = [f"| metric | RecBole {peer['model']} | momrec ({path.name}) |", "|---|---|---|"]
    rows += [f"| {k} | {peer['metrics'][k]:.4f} | {mine[k]:.4f} |" for k in keys]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out, args.workdir = args.out.resolve(), args.workdir.resolve()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "Pop" and not args.keep_pop_bug:
        Pop.calculate_loss = pop_loss_counting_every_interaction
    data_path = dataset_folder(args.inter, args.workdir, args.raw_timestamps)
    os.chdir(args.workdir)  # RecBole writes log/ and log_tensorboard/ into the working directory
    epochs = 1 if args.model == "Pop" else args.epochs  # Pop's ranking is final after one pass
    settings = {
        "data_path": str(data_path), "checkpoint_dir": str(args.workdir / "saved"),
        "use_gpu": torch.cuda.is_available(), "seed": args.seed, "reproducibility": True, "show_progress": False,
        # every interaction is a positive (no rating threshold), no k-core filtering: as momrec's ml-100k shards
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": 50, "n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "loss_type": "CE", "train_neg_sample_args": None,
        "learning_rate": args.lr, "train_batch_size": args.batch_size, "epochs": epochs, "eval_step": 1,
        "stopping_step": args.stopping_step,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": KS, "valid_metric": "NDCG@10", "eval_batch_size": 4096,
    }  # fmt: skip
    sys.argv = sys.argv[:1]  # RecBole's Config parses sys.argv too
    config = Config(model=args.model, dataset=DATASET, config_dict=settings)
    if Path(config["data_path"]).resolve() != (data_path / DATASET).resolve():
        raise SystemExit(f"error: RecBole reads {config['data_path']}, not {data_path / DATASET}")
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    best: dict[str, object] = {}

    def keep_best(epoch: int, verbose: bool = True, **_: object) -> None:  # replaces RecBole's pickled checkpoint
        best.update(epoch=epoch, state=copy.deepcopy(trainer.model.state_dict()))

    trainer._save_checkpoint = keep_best
    curve: list[dict[str, float]] = []
    start = time.time()
    trainer.fit(train_data, valid_data, saved=True, show_progress=False,
                callback_fn=lambda epoch, score: curve.append({"epoch": epoch, "valid/ndcg@10": float(score),
                                                               "s": time.time() - start}))  # fmt: skip
    train_s = time.time() - start
    trainer.model.load_state_dict(best["state"])
    test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    result = {
        "peer": "recbole", "model": args.model, "pop_fix": args.model == "Pop" and not args.keep_pop_bug,
        "timestamps": "raw" if args.raw_timestamps else "dense ranks",
        "settings": settings, "users": int(dataset.user_num - 1), "items": int(dataset.item_num - 1),
        "interactions": int(dataset.inter_num), "best_epoch": best["epoch"], "epochs_run": len(curve),
        "train_s": train_s, "curve": curve,
        "metrics": {**metric_names("valid", valid), **metric_names("test", test)},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    brief = {k: round(v, 4) for k, v in result["metrics"].items() if k.endswith(("ndcg@10", "hr@10"))}
    if args.momrec:
        print(side_by_side(result, json.loads(args.momrec.read_text(encoding="utf-8")), args.momrec))
    print(f"{args.model}: best epoch {best['epoch']} of {len(curve)}, {train_s:.0f} s; {brief} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
