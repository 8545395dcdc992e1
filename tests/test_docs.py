"""The user documentation stays complete and consistent with the code.

Every CLI sub-command and option (introspected from ``build_parser()``), every field of the settings
dataclasses and every argument of the configured dataset class must be documented in both languages;
relative links (and their anchors) must resolve; ``docs/en`` and ``docs/zh_cn`` must hold the same pages.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
from mmengine.config import Config

from xtuner_vl.cli.main import build_parser
from xtuner_vl.recipes import settings
from xtuner_vl.registry import DATASETS, MODELS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LANGS = ("en", "zh_cn")
PAGES = {"index.md", "data.md", "config.md", "training.md", "convert.md", "benchmarks.md", "cli.md"}
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CJK = re.compile(r"[\u4e00-\u9fff]")


# -- markdown helpers ------------------------------------------------------------------------------
def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines()):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((i, line))
    return out


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line number, level, title) of every heading outside code blocks."""
    found = [(i, _HEADING.match(line)) for i, line in prose_lines(text)]
    return [(i, len(m.group(1)), m.group(2)) for i, m in found if m]


def section(text: str, name: str, exact: bool = False) -> str | None:
    """The text under the one heading that names `` `name` `` (or, with ``exact``, whose title starts with
    ``name``), up to the next heading of its level or higher; None when no heading (or several) match."""
    lines = text.splitlines()
    marks = headings(text)
    hits = [
        (k, line, level)
        for k, (line, level, title) in enumerate(marks)
        if (title.startswith(name) if exact else f"`{name}`" in title)
    ]
    if len(hits) != 1:
        return None
    k, start, level = hits[0]
    end = next((line for line, lvl, _ in marks[k + 1 :] if lvl <= level), len(lines))
    return "\n".join(lines[start:end])


def mentions(text: str, word: str) -> bool:
    """``word`` occurs in ``text`` as a whole token (not inside a longer name or option)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def slug(title: str) -> str:
    """GitHub's anchor for a heading title (before de-duplication)."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, _, title in headings(text):
        base = slug(title)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links of ``text`` (the content of ``path``) whose file or heading anchor is missing."""
    prose = "\n".join(re.sub(r"`[^`]*`", "", line) for _, line in prose_lines(text))
    broken = []
    for target in _LINK.findall(prose):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md":
            body = text if dest == path else dest.read_text(encoding="utf-8")
            if anchor not in anchors(body):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading in {dest.name})")
    return broken


def doc(lang: str, page: str) -> str:
    return (DOCS / lang / page).read_text(encoding="utf-8")


# -- what the code defines -------------------------------------------------------------------------
def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def cli_gaps(text: str, commands: dict[str, argparse.ArgumentParser]) -> list[str]:
    """What of ``commands`` (options, positionals, choices, scalar defaults) ``text`` leaves out."""
    gaps = []
    for name, sub in commands.items():
        body = section(text, f"xtuner-vl {name}")
        if body is None:
            gaps.append(f"no section headed `xtuner-vl {name}`")
            continue
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            words = list(action.option_strings) or [action.metavar or action.dest]
            gaps += [f"{name}: {word}" for word in words if not mentions(body, word)]
            gaps += [f"{name} {words[-1]}: choice {c}" for c in action.choices or () if not mentions(body, str(c))]
            default = action.default
            if isinstance(default, (int, float, str)) and not isinstance(default, bool):
                if not mentions(body, str(default)):
                    gaps.append(f"{name} {words[-1]}: default {default}")
    return gaps


def settings_sections() -> dict[type, str | None]:
    """Each settings dataclass -> the config section it is parsed from (None: parsed nowhere): train.py's
    ``parse_section(Cls, ..., "name")``, the model wrapper's nested ``_section(Cls, ..., "model.name")``;
    and the registered model wrapper ``InternVLChat`` itself -> ``model``."""
    parsed = {}
    for file, function in (("train.py", "parse_section"), ("model_wrapper.py", "_section")):
        tree = ast.parse((ROOT / "xtuner_vl" / "recipes" / file).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == function:
                parsed[getattr(settings, node.args[0].id)] = node.args[2].value
    classes = [getattr(settings, n) for n in settings.__all__ if dataclasses.is_dataclass(getattr(settings, n))]
    wrapper = MODELS.get("InternVLChat")
    assert wrapper is not None and dataclasses.is_dataclass(wrapper), "InternVLChat is not a registered dataclass"
    return {wrapper: "model", **{cls: parsed.get(cls) for cls in classes}}


def _loads_config(fn: ast.FunctionDef) -> bool:
    """Whether ``fn`` binds ``cfg = load_config(...)`` (elsewhere ``cfg`` may be a model config)."""
    return any(
        isinstance(n, ast.Assign)
        and [getattr(t, "id", None) for t in n.targets] == ["cfg"]
        and isinstance(n.value, ast.Call)
        and getattr(n.value.func, "id", None) == "load_config"
        for n in ast.walk(fn)
    )


def config_names_read() -> set[str]:
    """Top-level config names the recipes read from a loaded config: ``cfg.get("name")`` and ``cfg.name``."""
    names = set()
    for path in sorted((ROOT / "xtuner_vl" / "recipes").glob("*.py")):
        module = ast.parse(path.read_text(encoding="utf-8"))
        functions = [f for f in ast.walk(module) if isinstance(f, ast.FunctionDef) and _loads_config(f)]
        for tree in functions:
            names |= _cfg_names(tree)
    return names


def _cfg_names(tree: ast.AST) -> set[str]:
    names = set()
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "cfg"):
            continue
        if id(node) not in called:
            names.add(node.attr)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and getattr(node.func.value, "id", None) == "cfg"
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(node.args[0].value)
    return names


def dataset_arguments() -> list[str]:
    """``type`` and the ``__init__`` parameters of the dataset class the shipped data config builds."""
    cfg = Config.fromfile(str(ROOT / "xtuner_vl" / "configs" / "_base_" / "datasets" / "llava_sft.py"))
    cls = DATASETS.get(cfg.train_dataset["type"])
    assert cls is not None, f"dataset type {cfg.train_dataset['type']!r} is not registered"
    return ["type"] + [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def config_gaps(text: str) -> list[str]:
    gaps = []
    for cls, name in settings_sections().items():
        body = text if name is None else section(text, name)
        if body is None:
            gaps.append(f"no section headed `{name}` ({cls.__name__})")
            continue
        gaps += [f"{name}.{f.name}" for f in dataclasses.fields(cls) if f"`{f.name}`" not in body]
    body = section(text, "train_dataset")
    if body is None:
        return gaps + ["no section headed `train_dataset`"]
    gaps += [f"train_dataset.{a}" for a in dataset_arguments() if f"`{a}`" not in body]
    gaps += [f"top-level `{n}`: no section" for n in sorted(config_names_read()) if section(text, n) is None]
    return gaps


# -- the tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("lang", LANGS)
def test_every_cli_command_and_option_is_documented(lang):
    commands = subcommands()
    assert {"train", "convert", "chat", "demo"} <= set(commands)
    assert cli_gaps(doc(lang, "cli.md"), commands) == []


@pytest.mark.parametrize("lang", LANGS)
def test_every_config_field_and_dataset_argument_is_documented(lang):
    assert all(name is not None for name in settings_sections().values()), "a settings class train.py never reads"
    assert {"model", "train_dataset"} <= config_names_read()
    assert config_gaps(doc(lang, "config.md")) == []


def test_relative_links_resolve():
    files = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    assert len(files) > 2 * len(PAGES)
    assert [b for f in files for b in broken_links(f, f.read_text(encoding="utf-8"))] == []


def test_both_languages_have_the_same_pages():
    trees = {lang: {str(p.relative_to(DOCS / lang)) for p in (DOCS / lang).rglob("*") if p.is_file()} for lang in LANGS}
    assert trees["en"] == trees["zh_cn"]
    assert PAGES <= trees["en"]


def test_index_pages_carry_the_readme_quick_start_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = section(readme, "Quick start", exact=True)
    commands = re.findall(r"```bash\n(.*?)\n```", quick or "", flags=re.S)
    assert len(commands) == 2
    for lang in LANGS:
        assert all(c in doc(lang, "index.md") for c in commands), lang


@pytest.mark.parametrize("page", sorted(PAGES))
def test_chinese_pages_are_written_in_chinese(page):
    prose = " ".join(re.sub(r"`[^`]*`|\([^)]*\)", "", line) for _, line in prose_lines(doc("zh_cn", page)))
    cjk, latin = len(_CJK.findall(prose)), len(re.findall(r"[A-Za-z]", prose))
    assert cjk > 0.5 * latin, f"{page}: {cjk} CJK characters against {latin} latin letters outside code"


# -- the checkers themselves find what is missing --------------------------------------------------
def test_cli_checker_reports_a_missing_option_choice_and_command():
    text = doc("en", "cli.md")
    commands = subcommands()
    assert "convert: --trust-base" in cli_gaps(text.replace("--trust-base", "--trust"), commands)
    assert "convert --format: choice hf" in cli_gaps(re.sub(r"`hf`|\bhf\b", "x", text), commands)
    parser = argparse.ArgumentParser()
    extra = parser.add_subparsers().add_parser("new-cmd")
    extra.add_argument("--flag", default=7)
    assert cli_gaps(text, {"new-cmd": extra}) == ["no section headed `xtuner-vl new-cmd`"]
    assert cli_gaps("## `xtuner-vl new-cmd`\n`--flag`\n", {"new-cmd": extra}) == ["new-cmd --flag: default 7"]


def test_config_checker_reports_a_missing_field_and_argument():
    text = doc("en", "config.md")
    assert "optim.lr_mult" in config_gaps(text.replace("`lr_mult`", "lr_mult"))
    assert "model.drop_path_rate" in config_gaps(text.replace("`drop_path_rate`", "drop_path_rate"))
    assert "model.lora.llm_targets" in config_gaps(text.replace("`llm_targets`", "llm_targets"))
    assert "model.freeze.unfreeze_vit_layers" in config_gaps(text.replace("| `unfreeze_vit_layers`", "| x"))
    assert "model.quantization.llm" in config_gaps(text.replace("| `llm` | str", "| x | str"))
    missing = text.replace("### `model.freeze`", "### model.freeze")
    assert "no section headed `model.freeze` (FreezeSettings)" in config_gaps(missing)
    assert "train_dataset.max_image_pixels" in config_gaps(text.replace("`max_image_pixels`", ""))
    assert "no section headed `runtime` (RuntimeSettings)" in config_gaps(text.replace("## `runtime`", "## runtime"))


def test_link_checker_and_sections_ignore_code_and_see_breakage():
    page = DOCS / "en" / "index.md"
    text = "# T\n\n## A `b`\n\n```bash\n# not a heading\n[x](missing.md)\n```\n"
    text += "[ok](#a-b) [bad](#nope) [gone](nope.md) `[code](nowhere.md)`\n"
    assert [h[2] for h in headings(text)] == ["T", "A `b`"]
    assert broken_links(page, text) == [
        "docs/en/index.md: #nope (no such heading in index.md)",
        "docs/en/index.md: nope.md (no such file)",
    ]
    assert section(text, "b").startswith("## A `b`") and section(text, "c") is None
    assert slug("`model.freeze` — FreezeSettings") == "modelfreeze--freezesettings"
