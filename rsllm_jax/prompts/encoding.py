"""Tokenizes prompts into token ids, with the spans and placeholders the model and losses use.

Text is tokenized piece by piece, in context: each piece is tokenized after a fixed anchor
string and the anchor's tokens are removed, so " Titanic" becomes the tokens it would be inside
a sentence, for SentencePiece (Llama 2) and byte-level BPE (Llama 3, SmolLM2) tokenizers alike.
Text pieces are tokenized with `split_special_tokens=True`: an artist literally named "[DSR]"
stays text and can never become the special token or a placeholder. Items are tokenized once
and cached, so building a prompt is list concatenation.

Length policy: the oldest history items are dropped first until the prompt fits
`max_length`; the candidates and the answer are never cut. If a prompt cannot fit even with
an empty history, `PromptTooLongError` names the row; `check_item_lengths` refuses, before any
prompt is built, a catalogue whose longest titles could make one.
"""

import dataclasses

from rsllm_jax.prompts import templates

# A letter: neither SentencePiece nor byte-level BPE merges it with a following space or comma
# (a newline would merge with spaces in byte-level BPE); checked at run time anyway.
_ANCHOR = "a"


class PromptTooLongError(ValueError):
    """A prompt does not fit `max_length` even without history items."""


@dataclasses.dataclass
class EncodedPrompt:
    """One training/eval example as token ids plus spans (positions index `tokens`)."""

    row_id: int
    target: int  # The target item's id.
    tokens: list  # [BOS] prompt answer [EOS]
    prompt_length: int  # The answer starts here; tokens[:prompt_length] is the prompt.
    answer_title_length: int  # Answer tokens before the EOS (the title).
    history_spans: list  # (start, end) of each kept history item, oldest first (g_U pooling).
    placeholders: list  # (position, item_id) of every behavioural-token placeholder.
    num_history_dropped: int
    target_tokens: list  # [BOS] + the target item alone, in the same format (tower T, g_I).
    target_item_start: int  # Where the item's own tokens start in target_tokens.
    target_placeholders: list  # (position in target_tokens, item_id).


def add_special_tokens(tokenizer, item_formats, num_items, iid_tokens=True):
    """Adds the tokens the formats of a run need (union over stages, in a fixed order) and
    returns their ids. The caller grows the embedding table to `len(tokenizer)`."""
    tokens = []
    for item_format in item_formats:
        for token in templates.special_tokens(item_format, num_items, iid_tokens):
            if token not in tokens:
                tokens.append(token)
    if tokens:
        # add_tokens(special_tokens=True) has the same meaning in transformers 4 and 5 and,
        # unlike add_special_tokens, never replaces the tokenizer's own extra special tokens.
        tokenizer.add_tokens(tokens, special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(token) for token in tokens]


class PromptEncoder:
    """Turns (history, candidates, target) rows into `EncodedPrompt`s for one item format."""

    def __init__(self, tokenizer, catalogue, item_format, max_length, iid_tokens=True,
                 chat_template=False):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; it terminates every answer")
        self.tokenizer = tokenizer
        self.catalogue = catalogue
        self.item_format = item_format
        self.max_length = max_length
        self.iid_tokens = iid_tokens
        self._chat = chat_template
        self._special_ids = {}
        for token in templates.special_tokens(item_format, catalogue.num_items, iid_tokens):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"special token {token!r} is not in the tokenizer: call "
                                 "add_special_tokens() for this item format first")
            self._special_ids[token] = token_id
        self._anchor = self._plain(_ANCHOR)
        self._item_cache = {}
        self._answer_cache = {}
        head, middle, tail = templates.prompt_frame(catalogue.domain)
        bos = self._leading_special_tokens()
        self._head = bos + self._plain(head)
        self._middle = self._in_context(middle)
        self._tail = self._in_context(tail)
        if chat_template:
            before, after = self._chat_turn()
            self._head = before + self._plain(head)
            self._tail = self._tail + after
        self._separator = self._in_context(templates.ITEM_SEPARATOR)
        self._bos = bos

    # --- tokenization ------------------------------------------------------------------------

    def _plain(self, text):
        return self.tokenizer(text, add_special_tokens=False,
                              split_special_tokens=True)["input_ids"]

    def _leading_special_tokens(self):
        """What the tokenizer itself puts before a text (Llama 2/3: BOS; SmolLM2: nothing)."""
        with_special = self.tokenizer(_ANCHOR)["input_ids"]
        plain = self._plain(_ANCHOR)
        for start in range(len(with_special) - len(plain) + 1):
            if with_special[start:start + len(plain)] == plain:
                return with_special[:start]
        return []

    def _chat_turn(self):
        """Tokens of the tokenizer's chat template before and after a user message, with the
        assistant's turn opened (instruction-tuned models answer zero-shot in it). The
        template is trusted text: its special tokens stay special."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"config.prompts.chat_template is set but the tokenizer "
                             f"{getattr(self.tokenizer, 'name_or_path', '')!r} has no chat "
                             "template")
        marker = "\u2063MESSAGE\u2063"
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                                  tokenize=False, add_generation_prompt=True)
        before, after = text.split(marker)
        ids = lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        # A template with nothing before the message still gets what the tokenizer puts first.
        bos = [] if before else self._leading_special_tokens()
        return bos + ids(before), ids(after)

    def _in_context(self, text):
        """Tokens of `text` as they appear after other text (see the module docstring)."""
        ids = self._plain(_ANCHOR + text)
        if ids[:len(self._anchor)] != self._anchor:
            raise ValueError(f"tokenizer {type(self.tokenizer).__name__} merges the anchor "
                             f"{_ANCHOR!r} with the text that follows it")
        return ids[len(self._anchor):]

    def item_tokens(self, item_id, role):
        """(token ids, placeholder offsets) of one item, cached."""
        key = (item_id, role if self.item_format == "llara" else "")
        if key not in self._item_cache:
            title = self.catalogue.title(item_id)
            ids, offsets = [], []
            for segment in templates.item_segments(self.item_format, item_id, title, role,
                                                   self.iid_tokens):
                if isinstance(segment, templates.Text):
                    ids += self._in_context(segment.text)
                else:
                    if isinstance(segment, templates.Placeholder):
                        offsets.append(len(ids))
                    ids.append(self._special_ids[segment.token])
            self._item_cache[key] = (ids, offsets)
        return self._item_cache[key]

    def answer_tokens(self, target):
        """The title after "The answer is" (or opening the assistant's turn), then EOS: what NIP
        (Eq. 2) scores. Cached: every training example and every evaluated candidate asks for
        one."""
        if target not in self._answer_cache:
            title = self.catalogue.title(target)
            # In a chat turn the answer starts the assistant's message, not a sentence.
            self._answer_cache[target] = self._plain(title) if self._chat else \
                self._in_context(" " + title)
        return list(self._answer_cache[target]), [self.tokenizer.eos_token_id]

    def check_item_lengths(self, num_candidates):
        """Checks, before any prompt is built, that every prompt can fit `max_length`: the
        longest one possible (the `num_candidates` longest candidates and the longest answer,
        every history item dropped) must. Otherwise raises PromptTooLongError naming the
        longest items, so a title that cannot fit stops a run at its start rather than at the
        first batch that holds it. Returns that longest prompt's length."""
        items = range(self.catalogue.num_items)
        candidates = sorted(((len(self.item_tokens(i, "candidate")[0]), i) for i in items),
                            reverse=True)
        answer = max(len(self.answer_tokens(i)[0]) + 1 for i in items)  # + EOS.
        longest = (len(self._head) + len(self._middle) + len(self._tail) +
                   len(self._separator) * max(num_candidates - 1, 0) +
                   sum(n for n, _ in candidates[:num_candidates]) + answer)
        if longest > self.max_length:
            short = lambda t: t if len(t) <= 40 else t[:40] + "..."  # noqa: E731
            named = ", ".join(f"item {i} {short(self.catalogue.title(i))!r} ({n} tokens)"
                              for n, i in candidates[:3])
            raise PromptTooLongError(
                f"{self.item_format} prompts of the {num_candidates} longest candidates and the "
                f"longest answer need {longest} tokens without any history item, more than "
                f"max_length={self.max_length}; the longest items: {named}; raise "
                f"config.prompts.max_length to {longest} or shorten those titles")
        return longest

    # --- prompts -----------------------------------------------------------------------------

    def encode(self, history, candidates, target, row_id=-1):
        """One prompt; `history` oldest first (ids only, no padding)."""
        history = [int(i) for i in history]
        candidate_items = [self.item_tokens(int(c), "candidate") for c in candidates]
        title, eos = self.answer_tokens(int(target))
        fixed = (len(self._head) + len(self._middle) + len(self._tail) + len(title) + len(eos) +
                 sum(len(ids) for ids, _ in candidate_items) +
                 len(self._separator) * max(len(candidate_items) - 1, 0))
        history_items = [self.item_tokens(i, "history") for i in history]
        lengths = [len(ids) + len(self._separator) for ids, _ in history_items]
        dropped = 0
        while dropped < len(history) and fixed + sum(lengths[dropped:]) - len(self._separator) \
                > self.max_length:
            dropped += 1
        if fixed > self.max_length:
            raise PromptTooLongError(
                f"row {row_id}: the prompt needs {fixed} tokens without any history item "
                f"(candidates and answer are never cut), more than max_length={self.max_length}")
        tokens, placeholders, history_spans = list(self._head), [], []

        def append_items(items, item_ids, spans):
            for k, ((ids, offsets), item_id) in enumerate(zip(items, item_ids)):
                if k:
                    tokens.extend(self._separator)
                start = len(tokens)
                placeholders.extend((start + o, item_id) for o in offsets)
                tokens.extend(ids)
                if spans is not None:
                    spans.append((start, len(tokens)))

        append_items(history_items[dropped:], history[dropped:], history_spans)
        tokens.extend(self._middle)
        append_items(candidate_items, [int(c) for c in candidates], None)
        tokens.extend(self._tail)
        prompt_length = len(tokens)
        tokens.extend(title + eos)
        target_ids, target_offsets = self.item_tokens(int(target), "target")
        return EncodedPrompt(
            row_id=int(row_id), target=int(target), tokens=tokens, prompt_length=prompt_length,
            answer_title_length=len(title), history_spans=history_spans, placeholders=placeholders,
            num_history_dropped=dropped, target_tokens=self._bos + target_ids,
            target_item_start=len(self._bos), target_placeholders=[(len(self._bos) + o, int(target))
                                                                   for o in target_offsets])

    def encode_batch(self, batch):
        """EncodedPrompts for the real rows of a data-pipeline batch (mask == True)."""
        return [
            self.encode(h[:n], c, t, r)
            for h, n, c, t, r, m in zip(batch["history"], batch["history_len"], batch["candidates"],
                                        batch["target"], batch["row_id"], batch["mask"]) if m
        ]
