"""Title files: id2name.txt (LF/CRLF), MovieLens u.item, normalisation, bad input."""

import pytest

from rsllm_jax.data.catalogue import (Catalogue, normalise_movie_title, read_id2name,
                                      read_movielens_items)
from rsllm_jax.data.errors import DataError


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_id2name_line_ends_and_double_colon_titles(tmp_path, newline):
    path = tmp_path / "id2name.txt"
    path.write_bytes(
        newline.join(["0::Morcheeba", "1::Café Del Mar", "2::Depths of Fear :: Knossos",
                      ""]).encode())
    catalogue = read_id2name(path, "artists")
    assert catalogue.titles == ("Morcheeba", "Café Del Mar", "Depths of Fear :: Knossos")
    assert catalogue.num_items == 3 and catalogue.pad_id == 3


def test_id2name_duplicate_id_names_the_line(tmp_path):
    path = tmp_path / "id2name.txt"
    path.write_text("0::A\n1::B\n1::C\n")
    with pytest.raises(DataError, match=r"id2name.txt, line 3: duplicate item id 1"):
        read_id2name(path, "artists")


@pytest.mark.parametrize("content, message", [
    ("0::A\nx::B\n", r"line 2: item id 'x' is not an integer"),
    ("0::A\n1 B\n", r"line 2: expected 'id::name'"),
    ("0::A\n-1::B\n", r"line 2: negative item id -1"),
    ("0::A\n2::C\n", r"not contiguous: missing \[1\]"),
])
def test_id2name_malformed_lines(tmp_path, content, message):
    path = tmp_path / "id2name.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_id2name(path, "artists")


def test_id2name_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "id2name.txt"
    path.write_bytes("0::Café\r\n1::Sigur Rós\r\n".encode() + b"2::Bj\xf6rk\r\n")  # latin-1 ö
    with pytest.raises(DataError, match=r"id2name.txt, line 3: not UTF-8 text \(byte 0xf6 at "
                       r"column 6\)"):
        read_id2name(path, "artists")


@pytest.mark.parametrize("raw, clean", [
    ("Toy Story (1995)", "Toy Story"),
    ("Usual Suspects, The (1995)", "The Usual Suspects"),
    ("Awfully Big Adventure, An (1995)", "An Awfully Big Adventure"),
    ("Horseman on the Roof, The (Hussard sur le toit, Le) (1995)",
     "The Horseman on the Roof (Hussard sur le toit, Le)"),
    ("Seven (Se7en) (1995)", "Seven (Se7en)"),
    ("unknown", ""),
])
def test_movie_title_normalisation(raw, clean):
    assert normalise_movie_title(raw) == clean


def test_llara_title_style_reproduces_its_quirks():
    assert normalise_movie_title("Usual Suspects, The (1995)", "llara") == "The Usual Suspects"
    # LLaRA's ", A" check also fires on ", An" and leaves the "n" behind.
    assert normalise_movie_title("Awfully Big Adventure, An (1995)", "llara") == \
        "A Awfully Big Adventuren"
    assert normalise_movie_title("unknown", "llara") == ""


def test_u_item_latin1_ids_and_empty_title_flag(tmp_path):
    path = tmp_path / "u.item"
    lines = [
        "1|Toy Story (1995)|01-Jan-1995||url|0", "2|Café Society, The (1995)|x||url|0",
        "3|unknown||||1"
    ]
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    catalogue = read_movielens_items(path)
    assert catalogue.titles == ("Toy Story", "The Café Society", "")
    assert catalogue.empty_title_ids == (2, )
    assert catalogue.domain == "movies"


def test_u_item_duplicate_movie(tmp_path):
    path = tmp_path / "u.item"
    path.write_text("1|A (1990)|\n1|B (1991)|\n")
    with pytest.raises(DataError, match=r"u.item, line 2: duplicate movie id 1"):
        read_movielens_items(path)


def test_catalogue_json_round_trip(tmp_path):
    catalogue = Catalogue(titles=("Ä", "", "B [DSR]"), domain="games")
    catalogue.save(tmp_path / "c.json")
    loaded = Catalogue.load(tmp_path / "c.json")
    assert loaded == catalogue and loaded.empty_title_ids == (1, )
    with pytest.raises(KeyError, match="outside the catalogue"):
        loaded.title(3)
