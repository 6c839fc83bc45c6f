"""The item catalogue: item id → title, read from LLaRA's title files and saved as JSON.

Item ids are 0..num_items-1 and the padding id is num_items, as in LLaRA's files (so LLaRA's
recommender checkpoints, whose embedding tables have num_items + 1 rows, line up with ours).
Empty titles (MovieLens item 267, "unknown") are kept but flagged: an empty string is a
substring of every answer, so later steps must never match it silently.
"""

import dataclasses
import json
import re

from rsllm_jax import run_paths
from rsllm_jax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """Titles indexed by item id; `pad_id == num_items`."""

    titles: tuple
    domain: str  # "artists", "movies" or "games": selects the prompt nouns later.

    @property
    def num_items(self):
        return len(self.titles)

    @property
    def pad_id(self):
        return len(self.titles)

    @property
    def empty_title_ids(self):
        """Ids whose title is empty after normalisation (flagged, never matched)."""
        return tuple(i for i, t in enumerate(self.titles) if not t.strip())

    def title(self, item_id):
        if not 0 <= item_id < self.num_items:
            raise KeyError(f"item id {item_id} is outside the catalogue [0, {self.num_items})")
        return self.titles[item_id]

    def save(self, path):
        run_paths.as_path(path).write_text(
            json.dumps(
                {
                    "domain": self.domain, "num_items": self.num_items, "pad_id": self.pad_id,
                    "empty_title_ids": list(self.empty_title_ids),
                    "titles": {str(i): t
                               for i, t in enumerate(self.titles)}
                }, ensure_ascii=False, indent=0))

    @classmethod
    def load(cls, path):
        try:
            raw = json.loads(run_paths.as_path(path).read_text())
            titles = raw["titles"]
            ordered = tuple(titles[str(i)] for i in range(len(titles)))
            return cls(titles=ordered, domain=raw["domain"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(path, f"not a valid catalogue file ({type(e).__name__}: {e})") from e


def read_id2name(path, domain):
    """Reads LastFM/Steam `id2name.txt`: lines `id::name`, LF or CRLF, ids 0..n-1.

    Only the first `::` separates: Steam has titles such as "Depths of Fear :: Knossos".
    """
    titles = {}
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()  # LF, CRLF or CR; bytes, so no other separators.
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror})") from e
    for line_no, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                path, f"not UTF-8 text (byte {raw[e.start]:#04x} at column "
                f"{e.start + 1})", row=f"line {line_no}") from None
        if not line.strip():
            continue
        key, sep, name = line.partition("::")
        if not sep:
            raise DataError(path, "expected 'id::name'", row=f"line {line_no}")
        try:
            item_id = int(key)
        except ValueError:
            raise DataError(path, f"item id {key!r} is not an integer",
                            row=f"line {line_no}") from None
        if item_id < 0:
            raise DataError(path, f"negative item id {item_id}", row=f"line {line_no}")
        if item_id in titles:
            raise DataError(path, f"duplicate item id {item_id}", row=f"line {line_no}")
        titles[item_id] = name.strip()
    return Catalogue(titles=_dense(titles, path), domain=domain)


_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_TRAILING_ARTICLE = re.compile(r"^(?P<head>.*), (?P<article>The|A|An)(?P<tail> \(.*\))?$")


def normalise_movie_title(raw, style="clean"):
    """MovieLens title normalisation (LLaRA's `get_movie_id2name`).

    `clean`: drop a trailing " (YYYY)", then move a trailing ", The" / ", A" / ", An" (also when
    followed by an alternative title in brackets) to the front: "Usual Suspects, The (1995)" →
    "The Usual Suspects".
    `llara`: LLaRA's code exactly: cut the last 7 characters, then for each of ", The", ", A",
    ", An" occurring anywhere, delete it and prefix the article (which turns
    "Awfully Big Adventure, An" into "A Awfully Big Adventuren"). For reproducing its numbers.
    """
    if style == "llara":
        title = raw[:-7]
        for sub in (", The", ", A", ", An"):
            if sub in title:
                title = sub[2:] + " " + title.replace(sub, "")
        return title
    if style != "clean":
        raise ValueError(f"unknown MovieLens title style {style!r} (expected 'clean' or 'llara')")
    title = _YEAR.sub("", raw).strip()
    if title.lower() == "unknown":
        return ""  # Item 267 has no title at all; flagged as empty, as with LLaRA's code.
    match = _TRAILING_ARTICLE.match(title)
    if match:
        title = f"{match['article']} {match['head']}{match['tail'] or ''}"
    return title


def read_movielens_items(path, style="clean"):
    """Reads MovieLens-100K `u.item` (pipe-separated, latin-1); id = movie_id − 1."""
    titles = {}
    with open(path, encoding="latin-1") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("|")
            if len(fields) < 2:
                raise DataError(path, "expected 'movie_id|title|...'", row=f"line {line_no}")
            try:
                item_id = int(fields[0]) - 1
            except ValueError:
                raise DataError(path, f"movie id {fields[0]!r} is not an integer",
                                row=f"line {line_no}") from None
            if item_id < 0:
                raise DataError(path, f"movie id {item_id + 1} must be >= 1", row=f"line {line_no}")
            if item_id in titles:
                raise DataError(path, f"duplicate movie id {item_id + 1}", row=f"line {line_no}")
            titles[item_id] = normalise_movie_title(fields[1], style)
    return Catalogue(titles=_dense(titles, path), domain="movies")


def _dense(titles, path):
    """Checks ids are exactly 0..n-1 and returns the titles in id order."""
    if not titles:
        raise DataError(path, "no items found")
    missing = sorted(set(range(max(titles) + 1)) - set(titles))
    if missing:
        raise DataError(
            path, f"item ids are not contiguous: missing {missing[:10]}" +
            (" ..." if len(missing) > 10 else ""))
    return tuple(titles[i] for i in range(len(titles)))


def catalogue_path(data_dir):
    return run_paths.as_path(data_dir) / "catalogue.json"
