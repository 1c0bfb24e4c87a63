"""H&M Personalized Fashion Recommendations, in the Kaggle competition's layout.

One domain is a folder::

    transactions_train.csv   t_dat,customer_id,article_id,price,sales_channel_id  (t_dat: YYYY-MM-DD)
    articles.csv             the competition's 25 article columns: article_id, prod_name, product_type_name,
                             colour_group_name, detail_desc, ...
    images/                  optional: images/<first 3 digits of the id>/<article_id>.jpg (or .jpeg, .png);
                             ``--images`` names another folder with the same layout

Field mapping:

- item id: ``article_id``, kept as a string: ids are 10 digits with a leading zero, and an all-digit id
  that lost its zeros (an integer round trip through a spreadsheet or pandas) is padded back to 10;
- user: ``customer_id``;
- time: ``t_dat``, the day at 00:00 UTC in unix seconds; purchases of one day keep their file order, and
  repeat purchases are kept (each is an interaction); ``price`` and ``sales_channel_id`` are not used;
- text: default ``{prod_name}.|{product_type_name}, {colour_group_name}.|{detail_desc}``
  ("Strap top. Vest top, Black. Jersey top with narrow shoulder straps."); every other articles.csv
  column can be named in ``--text-template``;
- image: ``images/<id[:3]>/<id>.jpg``; an article without a file has no image.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from ..errors import Skips
from .base import RawInteraction, RawItem, find_image, read_csv, require_file

TRANSACTIONS_FILE = "transactions_train.csv"
ARTICLES_FILE = "articles.csv"
IMAGES_FOLDER = "images"
ID_DIGITS = 10
DEFAULT_TEMPLATE = "{prod_name}.|{product_type_name}, {colour_group_name}.|{detail_desc}"


def article_id(value: str) -> str:
    """The id as a string; an all-digit id shorter than 10 digits gets its leading zeros back."""
    value = value.strip()
    return value.zfill(ID_DIGITS) if value.isascii() and value.isdigit() else value


@functools.lru_cache(maxsize=1 << 14)  # a transactions file repeats a few hundred distinct days
def day_seconds(value: str) -> float:
    """'YYYY-MM-DD' as unix seconds at 00:00 UTC; raises ValueError for anything else."""
    return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()


class HMReader:
    default_template: str | None = DEFAULT_TEMPLATE

    def __init__(self, folder: Path, images: Path | None = None, progress: bool = False) -> None:
        self.progress = progress
        self.articles_path = require_file(folder, ARTICLES_FILE, "articles")
        self.transactions_path = require_file(folder, TRANSACTIONS_FILE, "transactions")
        image_root = images or folder / IMAGES_FOLDER
        self.image_root = image_root if image_root.is_dir() else None

    def items(self, skips: Skips) -> Iterator[RawItem]:
        for line, row in read_csv(self.articles_path, skips, ("article_id",), progress=self.progress):
            item_id = article_id(row.pop("article_id"))
            if not item_id:
                skips.add(ARTICLES_FILE, line, "article_id", "empty value")
                continue
            fields = {name: value.strip() or None for name, value in row.items()}
            image = find_image(self.image_root / item_id[:3], item_id) if self.image_root else None
            yield RawItem(id=item_id, fields=fields, image=image, file=ARTICLES_FILE, line=line)

    def interactions(self, skips: Skips) -> Iterator[RawInteraction]:
        required = ("t_dat", "customer_id", "article_id")
        for line, row in read_csv(self.transactions_path, skips, required, progress=self.progress):
            user, item, day = row["customer_id"].strip(), article_id(row["article_id"]), row["t_dat"].strip()
            if not user or not item:
                skips.add(TRANSACTIONS_FILE, line, "customer_id" if not user else "article_id", "empty value")
                continue
            try:
                stamp = day_seconds(day)
            except ValueError:
                skips.add(TRANSACTIONS_FILE, line, "t_dat", f"malformed date: {day!r} (expected YYYY-MM-DD)")
                continue
            yield RawInteraction(user=user, item=item, timestamp=stamp, file=TRANSACTIONS_FILE, line=line)


def open_reader(folder: Path, *, images: Path | None = None, progress: bool = False) -> HMReader:
    return HMReader(folder, images, progress)
