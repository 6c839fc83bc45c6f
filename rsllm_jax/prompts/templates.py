"""The prompt text per domain and the item formats, as sequences of segments.

One place to edit the wording: one frame per domain, each from its source (LLaRA's templates
for LastFM and Steam, the paper's Example 4.1 for MovieLens). A prompt is a list of segments:
plain text (tokenized, and never allowed to produce a special token, whatever a title
contains), a special token (added to the vocabulary), or a placeholder whose input embedding
the model replaces with the projected recommender embedding of an item (paper §4.1.2, Eq. 1).

Item formats (paper Table 4 / Figure 3):
  text      the title ("textual feature"; TALLRec)
  text_id   title [DSR] [IID<id>] (§4.1.1 Text-ID prompting, stage 1); the ID is one new token
            per item, or its digits with `iid_tokens=False` ("numerical index")
  hybrid    title [DSR] <behaviour token> (§4.1.2 Hybrid prompting, stage 2)
  behavior  [DSR] <behaviour token> (ablation "w/o text", stage 2)
  iid       [DSR] [IID<id>], text_id without the title (ablation "w/o text" read as no titles
            in stage 1 either)
  id        the ID's digits alone (ablation)
  llara     title [HistoryEmb] / title [CansEmb], LLaRA's hybrid format
"""

import dataclasses

ITEM_FORMATS = ("text", "text_id", "hybrid", "behavior", "iid", "id", "llara")
# Formats that write an item's ID as an [IID<n>] token (or its digits, iid_tokens=False).
IID_FORMATS = ("text_id", "iid")
# Formats with behavioural-token placeholders (they read the recommender's item table).
PLACEHOLDER_FORMATS = ("hybrid", "behavior", "llara")

DSR = "[DSR]"  # "A recommender ID follows" (§4.1.1).
ITEM_EMB = "[ItemEmb]"  # Behavioural-token placeholder of the hybrid/behavior formats.
HISTORY_EMB = "[HistoryEmb]"  # LLaRA's placeholders.
CANS_EMB = "[CansEmb]"


def iid_token(item_id):
    return f"[IID{item_id}]"


@dataclasses.dataclass(frozen=True)
class Text:
    text: str


@dataclasses.dataclass(frozen=True)
class Special:
    token: str


@dataclasses.dataclass(frozen=True)
class Placeholder:
    token: str  # The placeholder's own vocabulary entry (its embedding is replaced).
    item_id: int


# The sentence around the history and candidate lists, per domain: (before the history, between
# history and candidates, after the candidates); the answer follows as " {title}".
PROMPT_FRAMES = {
    # LLaRA's LastFM template (prompt/artist.txt, first line).
    "artists": ("This user has listened to",
                " in the previous. Please predict the next music artist this user will listen "
                "to. The artist name candidates are",
                ". Choose only one artist from the candidates. The answer is"),
    # The paper's Example 4.1 (text-ID prompt) and 4.2 (hybrid prompt).
    "movies": ("This user has watched",
               " in the previous. Please predict the next movie this user will watch. The movie "
               "title candidates are",
               ", recommend one movie for this user to watch next. The movie title you "
               "recommend is"),
    # LLaRA's Steam template (prompt/game.txt, first line).
    "games": ("This user has played",
              " in the previous. Please predict the next game this user will play. The game "
              "title candidates are", ". Choose only one game from the candidates. The answer is"),
}


def prompt_frame(domain):
    """The three text pieces around the history list and the candidate list (PROMPT_FRAMES)."""
    if domain not in PROMPT_FRAMES:
        raise ValueError(f"unknown domain {domain!r}; expected one of {sorted(PROMPT_FRAMES)}")
    return PROMPT_FRAMES[domain]


ITEM_SEPARATOR = ","  # Items are joined with ", "; the space belongs to the next item's text.


def item_segments(item_format, item_id, title, role, iid_tokens=True):
    """How one item is written: a list of segments. `role` is "history", "candidate" or
    "target" (only LLaRA's format distinguishes history from candidates)."""
    if item_format == "text":
        return [Text(" " + title)]
    if item_format in IID_FORMATS:
        iid = Special(iid_token(item_id)) if iid_tokens else Text(f" {item_id}")
        return ([Text(" " + title)] if item_format == "text_id" else []) + [Special(DSR), iid]
    if item_format == "hybrid":
        return [Text(" " + title), Special(DSR), Placeholder(ITEM_EMB, item_id)]
    if item_format == "behavior":
        return [Special(DSR), Placeholder(ITEM_EMB, item_id)]
    if item_format == "id":
        return [Text(f" {item_id}")]
    if item_format == "llara":
        token = CANS_EMB if role == "candidate" else HISTORY_EMB
        return [Text(" " + title), Placeholder(token, item_id)]
    raise ValueError(f"unknown item format {item_format!r}; expected one of {ITEM_FORMATS}")


def special_tokens(item_format, num_items, iid_tokens=True):
    """The vocabulary entries a format needs, in a fixed order."""
    tokens = {
        "text": [],
        "id": [],
        "text_id": [DSR] + ([iid_token(i) for i in range(num_items)] if iid_tokens else []),
        "iid": [DSR] + ([iid_token(i) for i in range(num_items)] if iid_tokens else []),
        "hybrid": [DSR, ITEM_EMB],
        "behavior": [DSR, ITEM_EMB],
        "llara": [HISTORY_EMB, CANS_EMB],
    }
    if item_format not in tokens:
        raise ValueError(f"unknown item format {item_format!r}; expected one of {ITEM_FORMATS}")
    return tokens[item_format]
