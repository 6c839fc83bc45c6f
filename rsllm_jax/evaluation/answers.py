"""Reading a generated answer: which candidates it names, whether it is valid, whether it hits.

Two rules, reported side by side:

* `paper_match`, the rule of the paper's setup (LLaRA's `calculate_hr1`): keep the first line
  of the output, lowercase and strip it; every candidate whose lowercased, stripped title
  occurs in it as a substring is a match. Valid iff exactly one candidate matched; a hit iff
  that candidate's title is the target's title. Substring matches make it lenient ("Tavo Lumen"
  also names "Tavo", which makes the answer invalid) and an empty title matches every answer.
* `strict_match`: the first line, with whitespace collapsed and case folded, must equal one
  candidate's title normalised the same way. Valid iff exactly one candidate equals it.

Both return the indices of the matched candidates. HitRatio@1 is hits / all rows, so an invalid
answer counts as a miss: the published tables fit that (LLaRA-SASRec MovieLens 0.4421 = 42/95),
although LLaRA's `calculate_hr1` divides hits by the number of VALID answers; that quotient is
reported beside it as `hit_ratio_among_valid`, to compare with what LLaRA's code prints.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Judgement:
    matched: tuple  # Indices of the candidates the answer names.
    valid: bool
    hit: bool


def first_line(text):
    return text.strip().split("\n")[0]


def paper_match(generated, candidate_titles, target_title):
    """LLaRA's rule: lowercase substring matches over the first line of the output."""
    answer = first_line(generated).lower().strip()
    matched = tuple(i for i, title in enumerate(candidate_titles)
                    if title.lower().strip() in answer)
    valid = len(matched) == 1
    # LLaRA compares the matched title with the target's title, not item ids.
    hit = valid and candidate_titles[matched[0]].lower().strip() == target_title.lower().strip()
    return Judgement(matched, valid, hit)


def normalise(text):
    """Whitespace runs become one space, case is folded: "  The  Beatles\t" → "the beatles"."""
    return " ".join(text.split()).casefold()


def strict_match(generated, candidate_titles, target_index):
    """Exact-title rule: the first line equals one candidate's title after `normalise`."""
    answer = normalise(first_line(generated))
    matched = tuple(i for i, title in enumerate(candidate_titles) if normalise(title) == answer)
    valid = len(matched) == 1
    return Judgement(matched, valid, valid and matched[0] == target_index)


def ratios(judgements):
    """(valid ratio, hit ratio) as fractions of all rows."""
    n = max(len(judgements), 1)
    return (sum(j.valid for j in judgements) / n, sum(j.hit for j in judgements) / n)


def hit_ratio_among_valid(judgements):
    """Hits / valid answers: what LLaRA's `calculate_hr1` prints (0 without a valid answer)."""
    valid = sum(j.valid for j in judgements)
    return sum(j.hit for j in judgements) / valid if valid else 0.0
