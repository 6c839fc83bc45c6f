"""Item titles typed by a user → catalogue ids.

A title resolves exactly first, then ignoring case and runs of whitespace. A title no item has,
or one several items share, is an error that names the closest catalogue titles (or the ids
sharing it), so the user can correct the input instead of getting another item silently.
"""

import difflib


class UnknownItemError(ValueError):
    """An item reference that names no item, or several."""


def normalise(title):
    """Case- and whitespace-insensitive form of a title."""
    return " ".join(str(title).split()).casefold()


class TitleIndex:
    """Looks items up by title or id in one catalogue."""

    def __init__(self, catalogue):
        self.catalogue = catalogue
        self._exact, self._folded = {}, {}
        for item_id, title in enumerate(catalogue.titles):
            if title.strip():  # An empty title names nothing.
                self._exact.setdefault(title, []).append(item_id)
                self._folded.setdefault(normalise(title), []).append(item_id)

    def item_id(self, item):
        """The id of `item`: an int (an id, range-checked) or a str (a title)."""
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise UnknownItemError(f"{item!r}: an item is an id (integer) or a title (string)")
        if isinstance(item, int):
            if not 0 <= item < self.catalogue.num_items:
                raise UnknownItemError(f"item id {item} is outside the catalogue "
                                       f"[0, {self.catalogue.num_items})")
            return item
        return self.resolve(item)

    def resolve(self, title):
        """The id of the item called `title` (see the module docstring)."""
        for ids in (self._exact.get(title), self._folded.get(normalise(title))):
            if ids and len(ids) == 1:
                return ids[0]
            if ids:
                named = ", ".join(f"{self.catalogue.titles[i]!r} (id {i})" for i in ids)
                raise UnknownItemError(f"title {title!r} is ambiguous: it names {named}; give "
                                       "the id instead")
        raise UnknownItemError(f"no item is titled {title!r}; closest titles: "
                               f"{self.closest(title) or 'none'}")

    def closest(self, title, n=5):
        """Up to `n` catalogue titles that look like `title`, most alike first, quoted."""
        query = normalise(title)
        matches = difflib.get_close_matches(query, list(self._folded), n=n, cutoff=0.5)
        if query:  # Titles that contain the query: "beatles" finds "The Beatles".
            contain = [t for t in self._folded if query in t and t not in matches]
            matches += contain[:n - len(matches)]
        return ", ".join(repr(self.catalogue.titles[self._folded[t][0]]) for t in matches)
