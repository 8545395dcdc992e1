"""Turn a LLaVA-style conversation into input ids and labels, as the official InternVL fine-tuning does.

``input_ids`` equal the official ones: for ``internlm2-chat``, ``Hermes-2`` and ``phi3-chat`` the tokenization
of the whole joined prompt (with the special tokens the tokenizer itself prepends, e.g. BOS, and no EOS:
the official code loads tokenizers with ``add_eos_token=False``); for ``internvl2_5`` and ``internvl3_5_gpt_oss``
the concatenated tokenization of each message block. Labels train each assistant answer and its closing separator
(for ``internvl3_5_gpt_oss`` also the channel header, and ``<|return|>`` closes the last answer: see
:mod:`xtuner_vl.dataset.templates`), nothing else, like the official masking; but where the official code
measures spans by re-tokenizing pieces and silently drops the whole sample when its counts disagree
("tokenization mismatch"), we find the span boundaries exactly and raise :class:`ConversationError` if a token
straddles one.

Boundaries are found on the prompt with every image collapsed to ``<img><IMG_CONTEXT></img>`` (cheap), then
each ``<IMG_CONTEXT>`` is repeated to its image's token count. That is exact because the image tokens are
added special tokens that the tokenizer splits on, which :func:`_image_token_ids` checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from xtuner_vl.dataset.templates import Template, get_template
from xtuner_vl.structures import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN

__all__ = [
    "IMAGE_PLACEHOLDER",
    "ConversationError",
    "ensure_image_placeholder",
    "expand_image_tokens",
    "tokenize_conversation",
]

IMAGE_PLACEHOLDER = "<image>"
_HUMAN, _GPT, _SYSTEM = "human", "gpt", "system"
_RESERVED = (IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN)
_MAX_STRADDLE_CHARS = 16  # how far a token straddling a label boundary may reach past it

Pieces = list[tuple[str, bool]]  # (text, trained) spans of one tokenized block


class ConversationError(ValueError):
    """A conversation that cannot become a training sample with at least one trained token."""


def ensure_image_placeholder(conversations: Sequence[dict[str, Any]], num_images: int) -> list[dict[str, Any]]:
    """Prepend ``<image>\\n`` to the first human turn of a single-image sample that has no ``<image>``.

    The official code checks only the first turn; we prepend only when no human turn holds a placeholder, so
    a sample whose image is referenced in a later turn keeps it there (the official code would prepend a
    second placeholder and leave one as literal text).

    Args:
        conversations: LLaVA turns ``{"from": ..., "value": ...}``; not modified.
        num_images: images of the sample; nothing is added unless it is 1.

    Returns:
        A new list of new dicts (the input is left as it was).
    """
    turns = [dict(turn) for turn in conversations]
    humans = [turn for turn in turns if turn.get("from") == _HUMAN and isinstance(turn.get("value"), str)]
    if num_images == 1 and humans and not any(IMAGE_PLACEHOLDER in turn["value"] for turn in humans):
        humans[0]["value"] = IMAGE_PLACEHOLDER + "\n" + humans[0]["value"]
    return turns


def _image_text(num_tokens: int) -> str:
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * num_tokens + IMG_END_TOKEN


def expand_image_tokens(text: str, num_image_tokens: Sequence[int]) -> str:
    """Replace each ``<image>``, left to right, by ``<img>`` + ``<IMG_CONTEXT>`` x n + ``</img>``.

    Args:
        text: text holding exactly ``len(num_image_tokens)`` placeholders.
        num_image_tokens: context tokens per image (256 per tile), in placeholder order.

    Returns:
        The expanded text.

    Raises:
        ConversationError: the placeholder count differs from ``len(num_image_tokens)``, or a count is not a
            positive int.
    """
    counts = list(num_image_tokens)
    found = text.count(IMAGE_PLACEHOLDER)
    if found != len(counts):
        raise ConversationError(
            f"the text holds {found} {IMAGE_PLACEHOLDER} placeholder(s) but {len(counts)} "
            f"image token count(s) were given ({counts})"
        )
    if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in counts):
        raise ConversationError(f"image token counts must be positive ints, got {counts}")
    chunks = text.split(IMAGE_PLACEHOLDER)
    return chunks[0] + "".join(_image_text(n) + chunk for n, chunk in zip(counts, chunks[1:], strict=True))


def _as_count_list(num_image_tokens: int | Sequence[int]) -> list[int]:
    if isinstance(num_image_tokens, int) and not isinstance(num_image_tokens, bool):
        return [num_image_tokens] if num_image_tokens else []
    return list(num_image_tokens)


def _check_turn(index: int, turn: Any) -> tuple[str, str]:
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
        raise ConversationError(f"turn {index} must be a dict with 'from' and a str 'value', got {turn!r}")
    role = turn["from"]
    if role not in (_HUMAN, _GPT, _SYSTEM):
        raise ConversationError(f"turn {index} has unknown role {role!r}; known roles: human, gpt, system")
    if role == _SYSTEM and index != 0:
        raise ConversationError(f"turn {index} is a system turn; only the first turn may be one")
    for reserved in _RESERVED:
        if reserved in turn["value"]:
            raise ConversationError(
                f"turn {index} types the reserved image token {reserved} literally; only "
                f"{IMAGE_PLACEHOLDER} placeholders may stand for images"
            )
    if role != _HUMAN and IMAGE_PLACEHOLDER in turn["value"]:
        raise ConversationError(f"turn {index} ({role}) holds {IMAGE_PLACEHOLDER}; only human turns may")
    return role, turn["value"]


def _parse(conversations: Sequence[dict[str, Any]], template: Template) -> tuple[str, list[str], list[tuple[str, str]]]:
    """Validate the turns; return the system message, the leading answers and the (question, answer) pairs,
    stripped if the template strips. A leading system turn replaces the template's system message (as
    ``internvl2_5`` does; the InternVL2-era code crashes on one). Gpt turns before the first human turn are
    the leading answers where the template keeps them (``preprocess_internvl2_5`` writes every turn), else
    dropped (the other preprocess functions drop one)."""
    if not conversations:
        raise ConversationError("empty conversation")
    turns = [_check_turn(i, turn) for i, turn in enumerate(conversations)]
    system = template.system_message
    if turns[0][0] == _SYSTEM:
        system = turns.pop(0)[1]
        system = system.strip() if template.strip_values else system
    leading = []
    while turns and turns[0][0] == _GPT:
        leading.append(turns.pop(0)[1])
    leading = leading if template.keeps_leading_answers else []
    if not turns and not leading:
        raise ConversationError("no human turn: nothing to answer")
    for i, (role, _) in enumerate(turns):
        if role != (_HUMAN, _GPT)[i % 2]:
            raise ConversationError(f"roles must alternate human, gpt, ...; got {[r for r, _ in turns]}")
    if len(turns) % 2:
        raise ConversationError("the conversation ends with a human turn that has no assistant answer")
    values = [value.strip() if template.strip_values else value for _, value in turns]
    leading = [value.strip() if template.strip_values else value for value in leading]
    return system, leading, list(zip(values[0::2], values[1::2], strict=True))


def _build_blocks(
    template: Template, system: str, pairs: list[tuple[str, str]], leading: Sequence[str] = ()
) -> list[Pieces]:
    """The prompt as tokenization blocks of (text, trained) pieces: one block holding the joined prompt, or
    one per message for templates that tokenize each message on its own. ``leading`` answers come right
    after the system block."""
    user, assistant = template.roles
    masked_header = assistant[: len(assistant) - len(template.trained_header)]
    blocks: list[Pieces] = [[(template.system_template.format(system_message=system) + template.sep, False)]]
    # The official joined-prompt builder (conversation.py, MPT style) writes an empty message as a bare role
    # header without separator, so an empty answer trains nothing; per-message templates always write it.
    closed = template.per_message_tokenization
    last = len(leading) + len(pairs) - 1  # index of the conversation's last answer

    def answer_block(answer: str, index: int) -> Pieces:
        sep, trained_sep = template.sep, template.trained_sep
        if index == last and template.last_sep is not None:
            sep = trained_sep = template.last_sep
        if answer or closed:
            trained = template.trained_header + answer + trained_sep
            return [(masked_header, False), (trained, True), (sep[len(trained_sep) :], False)]
        return [(assistant, False)]

    blocks += [answer_block(answer, i) for i, answer in enumerate(leading)]
    for i, (question, answer) in enumerate(pairs, start=len(leading)):
        blocks.append([(user + question + (template.sep if question or closed else ""), False)])
        blocks.append(answer_block(answer, i))
    if not template.per_message_tokenization:
        blocks = [[piece for block in blocks for piece in block]]
    merged_blocks = []
    for block in blocks:
        merged: Pieces = []
        for text, trained in block:
            if not text:
                continue
            if merged and merged[-1][1] == trained:
                merged[-1] = (merged[-1][0] + text, trained)
            else:
                merged.append((text, trained))
        merged_blocks.append(merged)
    return merged_blocks


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before a text (BOS or nothing). Appended ones (EOS) are left out, as the
    official code loads tokenizers with ``add_eos_token=False``."""
    probe = "a"
    plain, full = _encode(tokenizer, probe), list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    raise ConversationError(f"cannot tell which special tokens {type(tokenizer).__name__} adds: {full} vs {plain}")


def _exact_start(tokenizer: Any, text: str, ids: list[int], offset: int) -> int | None:
    """How many of the whole prompt's ``ids`` cover exactly ``text[:offset]``, or None if a token straddles it."""
    head = _encode(tokenizer, text[:offset])
    return len(head) if ids[: len(head)] == head else None


def _boundary(tokenizer: Any, text: str, ids: list[int], offset: int, span: range, left_trained: bool) -> int:
    """Token index of the boundary at char ``offset``. A token straddling it (the ``\\n`` ending a role header
    merged with an answer's leading ``\\n`` into one ``\\n\\n`` token) goes to the untrained side, as it does in
    the official code: the nearest exact boundary within ``span`` on that side is used."""
    start = _exact_start(tokenizer, text, ids, offset)
    search = range(offset - 1, span.start, -1) if left_trained else range(offset + 1, span.stop)
    for candidate in search[:_MAX_STRADDLE_CHARS]:
        if start is not None:
            break
        start = _exact_start(tokenizer, text, ids, candidate)
    if start is None:
        raise ConversationError(
            f"no token boundary near {text[max(0, offset - 40) : offset]!r} | {text[offset : offset + 40]!r}: the "
            "tokenizer merges text across the end of a role header or answer, so labels cannot be placed exactly"
        )
    return start


def _boundaries(tokenizer: Any, pieces: Pieces, ids: list[int]) -> list[int]:
    """Token index at which each piece starts, plus the end."""
    piece_ids = [_encode(tokenizer, text) for text, _ in pieces]
    starts = [0]
    if sum(piece_ids, []) == ids:  # pieces tokenize independently (no prefix space or strip across them)
        for chunk in piece_ids:
            starts.append(starts[-1] + len(chunk))
        return starts
    # Context changes the pieces' tokens (Phi-3's dummy prefix space, rstrip role tokens, merged whitespace): a
    # boundary is exact where the prompt up to it tokenizes to a prefix of the whole prompt's ids.
    text = "".join(text for text, _ in pieces)
    offsets = [0]
    for piece_text, _ in pieces:
        offsets.append(offsets[-1] + len(piece_text))
    for i in range(1, len(pieces)):
        span = range(offsets[i - 1], offsets[i + 1])
        starts.append(_boundary(tokenizer, text, ids, offsets[i], span, left_trained=pieces[i - 1][1]))
    starts.append(len(ids))
    if starts != sorted(starts):
        raise ConversationError(f"label boundaries out of order ({starts}); the tokenizer merges text across pieces")
    return starts


def _tokenize_block(tokenizer: Any, pieces: Pieces) -> tuple[list[int], list[int]]:
    ids = _encode(tokenizer, "".join(text for text, _ in pieces))
    starts = _boundaries(tokenizer, pieces, ids)
    labels = []
    for (_, trained), begin, end in zip(pieces, starts[:-1], starts[1:], strict=True):
        labels.extend(ids[begin:end] if trained else [IGNORE_INDEX] * (end - begin))
    return ids, labels


def _image_token_ids(tokenizer: Any) -> tuple[int, int, int]:
    """Ids of ``<img>``, ``<IMG_CONTEXT>``, ``</img>``; each must be one token that text never merges into."""
    ids = _encode(tokenizer, _image_text(2))
    if len(ids) != 4 or ids[1] != ids[2]:
        raise ConversationError(
            f"{type(tokenizer).__name__} does not keep {_RESERVED} as single tokens "
            f"({ids}); load the tokenizer of an InternVL checkpoint"
        )
    return ids[0], ids[1], ids[3]


def _expand_context(ids: list[int], labels: list[int], context_id: int, counts: list[int]) -> tuple[list, list]:
    positions = [i for i, token in enumerate(ids) if token == context_id]
    if len(positions) != len(counts):
        raise ConversationError(f"expected {len(counts)} image(s) in the tokenized prompt, found {len(positions)}")
    out_ids, out_labels, last = [], [], 0
    for position, count in zip(positions, counts, strict=True):
        out_ids += ids[last:position] + [context_id] * count
        out_labels += labels[last:position] + [IGNORE_INDEX] * count
        last = position + 1
    return out_ids + ids[last:], out_labels + labels[last:]


def _tokenize_prompt(
    tokenizer: Any, template: Template, system: str, pairs: list[tuple[str, str]], leading: Sequence[str] = ()
) -> tuple[list[int], list[int]]:
    prefix = _special_prefix(tokenizer)
    blocks = _build_blocks(template, system, pairs, leading)
    ids: list[int] = []
    labels: list[int] = []
    if template.per_message_tokenization and prefix:
        # preprocess_internvl2_5 writes BOS as text before the first block, which is then tokenized after it
        # (no dummy-prefix space there for Llama-style tokenizers).
        blocks[0][0] = ("".join(tokenizer.convert_ids_to_tokens(prefix)) + blocks[0][0][0], False)
    else:
        ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    for pieces in blocks:
        block_ids, block_labels = _tokenize_block(tokenizer, pieces)
        ids += block_ids
        labels += block_labels
    if ids[: len(prefix)] != prefix:
        raise ConversationError(f"{type(tokenizer).__name__} does not read its own BOS text as BOS {prefix}")
    return ids, labels


def tokenize_conversation(
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    template: Template | str,
    num_image_tokens: int | Sequence[int] = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize a LLaVA conversation like the official InternVL fine-tuning code, with exact labels.

    Args:
        conversations: ``[{"from": "human" | "gpt", "value": str}, ...]``, optionally opened by a
            ``{"from": "system"}`` turn that replaces the template's system message. Leading gpt turns are
            dropped, except under ``internvl2_5`` and ``internvl3_5_gpt_oss``, which train them as the official
            code does; the rest must alternate human, gpt and end with gpt. As in the official prompt builder,
            an empty message becomes a bare role header (no separator, nothing trained), except for
            ``internvl2_5`` and ``internvl3_5_gpt_oss``. Call
            :func:`ensure_image_placeholder` first for single-image data that may lack ``<image>``.
        tokenizer: the checkpoint's tokenizer (``xtuner_vl.model.tokenizer.load_tokenizer``).
        template: a :class:`Template` or a template name (InternVL2 system messages).
        num_image_tokens: context tokens per ``<image>`` placeholder (256 x tiles): a list in placeholder
            order, an int for one image, or ``0`` / ``[]`` for a text-only sample.

    Returns:
        ``(input_ids, labels)``, 1-D long tensors of equal length; labels are ``IGNORE_INDEX`` except on
        each answer and its closing separator (and the trained tail of the assistant header). No truncation.

    Raises:
        ConversationError: empty conversation, unknown role, misplaced system turn, roles not alternating,
            no assistant answer, no trained token (only empty answers), ``<image>`` count not matching
            ``num_image_tokens`` or outside human turns, image tokens typed literally, or a label boundary that
            no token boundary lies near.
    """
    if isinstance(template, str):
        template = get_template(template)
    counts = _as_count_list(num_image_tokens)
    system, leading, pairs = _parse(conversations, template)
    placeholders = sum(question.count(IMAGE_PLACEHOLDER) for question, _ in pairs)
    if placeholders != len(counts):
        raise ConversationError(
            f"the conversation holds {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
            f"{len(counts)} image token count(s) were given ({counts})"
        )
    # Boundaries are computed with each image collapsed to one context token (see the module docstring).
    pairs = [
        (expand_image_tokens(question, [1] * question.count(IMAGE_PLACEHOLDER)), answer) for question, answer in pairs
    ]
    ids, labels = _tokenize_prompt(tokenizer, template, system, pairs, leading)
    if counts:
        _, context_id, _ = _image_token_ids(tokenizer)
        ids, labels = _expand_context(ids, labels, context_id, counts)
    if all(label == IGNORE_INDEX for label in labels):
        raise ConversationError("the sample has no trained token")
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
