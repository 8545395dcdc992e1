"""Chat templates of the official InternVL 1.5 / 2 / 2.5 / 3.5-GPT-OSS releases, as their fine-tuning code applies them.

Every template uses InternVL's "MPT" layout: ``system_template.format(system_message=...) + sep``, then
``role + message + sep`` per turn. What differs between them, and is recorded here, is what the official
preprocess function of each template does around that layout:

- ``internlm2-chat`` (``preprocess_internlm``): values are stripped; the tokenizer's BOS is expected.
- ``Hermes-2`` (``preprocess_mpt``): values kept verbatim; no BOS expected.
- ``phi3-chat`` (``preprocess_phi3``): values kept verbatim; the tokenizer's BOS is expected.
- ``internvl2_5`` (``preprocess_internvl2_5``): values kept verbatim; each message block is tokenized on
  its own and the ``\\n`` closing an assistant block is not trained; a conversation that opens with gpt
  turns keeps and trains them (the other preprocess functions drop a leading gpt turn).
- ``internvl3_5_gpt_oss`` (``preprocess_internvl3_5_gpt_oss``, OpenGVLab/InternVL
  ``internvl_chat_gpt_oss/internvl/train/dataset.py``): OpenAI's harmony format, one block per message tokenized on
  its own like ``internvl2_5``: ``<|start|>system<|message|>...<|end|>``, ``<|start|>user<|message|>...<|end|>``,
  ``<|start|>assistant<|channel|>final<|message|>...`` closed by ``<|return|>`` or ``<|end|>``. Only
  ``<|start|>assistant`` is masked: the channel header, the answer and its closing token are trained. One
  deviation: the official code picks ``<|return|>`` with a stale loop variable (``i`` of its ``<image>``
  expansion loop, unbound for text-only samples, which then fail and are skipped); we apply the rule its comment
  and the template's ``get_prompt`` state: ``<|return|>`` after the conversation's last message (an answer),
  ``<|end|>`` after every other one.

The default system message depends on the release that trained the checkpoint (see ``SYSTEM_MESSAGES``):
InternVL-Chat-V1-5 / Mini-InternVL-V1-5 (``version="internvl1_5"``) used older messages than InternVL2
(``version="internvl2"``); ``internvl2_5`` and ``internvl3_5_gpt_oss`` have their own.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SYSTEM_MESSAGES",
    "SYSTEM_PRESETS",
    "THINKING_SYSTEM_PROMPT",
    "TEMPLATE_NAMES",
    "VERSIONS",
    "Template",
    "get_template",
    "resolve_system_message",
]

_INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
_INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
# internvl_chat_gpt_oss/internvl/model/internvl_chat/conversation.py, template internvl3_5_gpt_oss.
_GPT_OSS_SYSTEM = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every "
    "message."
)

# InternVL3.5 "thinking" mode: the R1_SYSTEM_PROMPT of the InternVL3.5 model cards (``model.system_message =
# R1_SYSTEM_PROMPT``) and of OpenGVLab/InternVL internvl_chat_gpt_oss/internvl/train/internvl_chat_mpo.py, stripped as
# the model cards use it. The model then reasons inside <think>...</think> before its answer.
THINKING_SYSTEM_PROMPT = (
    "You are an AI assistant that rigorously follows this response protocol:\n\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and "
    "reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> "
    "tags.\n\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the "
    "answer from the think section with a newline.\n\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section."
)
# Names a config's ``system_message`` (or ``chat --system``) may give instead of the text.
SYSTEM_PRESETS = {"internvl3_5_thinking": THINKING_SYSTEM_PROMPT}

VERSIONS = ("internvl1_5", "internvl2")

# Default system message per (release version, template), from the official conversation.py of each release.
SYSTEM_MESSAGES: dict[str, dict[str, str]] = {
    "internvl1_5": {
        "internlm2-chat": "You are an AI assistant whose name is InternLM (书生·浦语).",
        "Hermes-2": "Answer the questions.",
        "phi3-chat": "You are an AI assistant whose name is Phi-3.",
        "internvl2_5": _INTERNVL2_5_SYSTEM,
        "internvl3_5_gpt_oss": _GPT_OSS_SYSTEM,
    },
    "internvl2": {
        "internlm2-chat": _INTERNVL2_SYSTEM,
        "Hermes-2": _INTERNVL2_SYSTEM,
        "phi3-chat": _INTERNVL2_SYSTEM,
        "internvl2_5": _INTERNVL2_5_SYSTEM,
        "internvl3_5_gpt_oss": _GPT_OSS_SYSTEM,
    },
}


@dataclass(frozen=True)
class Template:
    """One InternVL chat template and the official preprocessing choices that go with it.

    Attributes:
        name: the official template name (``config.json``'s ``template``).
        system_template: format string of the system block, with a ``{system_message}`` field.
        system_message: the system message put into ``system_template``.
        roles: (user role header, assistant role header), e.g. ``("<|im_start|>user\\n", ...)``.
        sep: text closing the system block and every message.
        trained_sep: the leading part of ``sep`` that is trained after each answer (all of ``sep`` except
            for ``internvl2_5``, whose trailing ``\\n`` is not trained).
        last_sep: closes the conversation's last answer instead of ``sep`` and is trained whole
            (``<|return|>`` for ``internvl3_5_gpt_oss``); None: ``sep`` everywhere.
        trained_header: the trailing part of the assistant header ``roles[1]`` that is trained with the answer
            (the harmony channel header ``<|channel|>final<|message|>``); empty elsewhere.
        strip_values: whether message values are ``str.strip()``-ed (only ``preprocess_internlm`` does).
        expects_bos: whether the official masking assumes the tokenizer prepends BOS. Informational: our
            input ids always carry exactly the special tokens the tokenizer itself prepends.
        per_message_tokenization: whether each message block is tokenized on its own and the ids
            concatenated (``internvl2_5``) rather than the joined prompt tokenized once.
        keeps_leading_answers: whether gpt turns before the first human turn are kept and trained
            (``internvl2_5``) rather than dropped.
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    trained_sep: str
    strip_values: bool = False
    expects_bos: bool = False
    per_message_tokenization: bool = False
    keeps_leading_answers: bool = False
    last_sep: str | None = None
    trained_header: str = ""

    def __post_init__(self) -> None:
        if not self.sep.startswith(self.trained_sep) or not self.roles[1].endswith(self.trained_header):
            raise ValueError(f"template {self.name!r}: trained_sep must start sep, trained_header end roles[1]")


_CHATML = dict(
    system_template="<|im_start|>system\n{system_message}", roles=("<|im_start|>user\n", "<|im_start|>assistant\n")
)
_TEMPLATES: dict[str, dict] = {
    "internlm2-chat": dict(**_CHATML, sep="<|im_end|>", trained_sep="<|im_end|>", strip_values=True, expects_bos=True),
    "Hermes-2": dict(**_CHATML, sep="<|im_end|>", trained_sep="<|im_end|>"),
    "phi3-chat": dict(
        system_template="<|system|>\n{system_message}",
        roles=("<|user|>\n", "<|assistant|>\n"),
        sep="<|end|>",
        trained_sep="<|end|>",
        expects_bos=True,
    ),
    "internvl2_5": dict(
        **_CHATML,
        sep="<|im_end|>\n",
        trained_sep="<|im_end|>",
        per_message_tokenization=True,
        keeps_leading_answers=True,
    ),
    "internvl3_5_gpt_oss": dict(
        system_template="<|start|>system<|message|>{system_message}",
        roles=("<|start|>user<|message|>", "<|start|>assistant<|channel|>final<|message|>"),
        sep="<|end|>",
        trained_sep="<|end|>",
        last_sep="<|return|>",
        trained_header="<|channel|>final<|message|>",
        per_message_tokenization=True,
        keeps_leading_answers=True,
    ),
}
TEMPLATE_NAMES = tuple(_TEMPLATES)


def get_template(name: str, system_message: str | None = None, version: str = "internvl2") -> Template:
    """Build the template ``name`` with the system message of release ``version`` (or ``system_message``).

    Args:
        name: ``internlm2-chat``, ``Hermes-2``, ``phi3-chat``, ``internvl2_5`` or ``internvl3_5_gpt_oss`` (a
            checkpoint's ``config.json`` ``template``).
        system_message: overrides the release default when given (a config's ``system_message``); ``""``
            keeps an empty system block, as the official code does; ``"internvl3_5_thinking"`` is the InternVL3.5
            thinking prompt (:data:`THINKING_SYSTEM_PROMPT`).
        version: ``"internvl2"`` (InternVL2 defaults) or ``"internvl1_5"`` (the messages InternVL-Chat-V1-5
            and Mini-InternVL-V1-5 were trained with). ``internvl2_5`` and ``internvl3_5_gpt_oss`` have one message
            for both.

    Returns:
        The frozen :class:`Template`.

    Raises:
        ValueError: unknown template name or version.
    """
    if name not in _TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known templates: {', '.join(TEMPLATE_NAMES)}")
    if version not in SYSTEM_MESSAGES:
        raise ValueError(f"unknown release version {version!r}; known versions: {', '.join(VERSIONS)}")
    if system_message is None:
        system_message = SYSTEM_MESSAGES[version][name]
    return Template(name=name, system_message=resolve_system_message(system_message), **_TEMPLATES[name])


def resolve_system_message(system_message: str) -> str:
    """``system_message`` itself, or the text of the preset it names (:data:`SYSTEM_PRESETS`)."""
    return SYSTEM_PRESETS.get(system_message, system_message)
