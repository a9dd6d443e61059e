"""``tokenbudget eval-vlm`` on a tiny random LLaVA saved with its own processor, run as users run it.

The model is random, so the questions' answers are made checkable: for a known subset of the lines
the answer is what the unpatched model generates (computed here, one question at a time, with no
padding), for the rest a word it cannot say. The command's batched, left-padded ``full`` row must
then score exactly that subset.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

import tokenbudget.config.vlm
import tokenbudget.patch
from tokenbudget.cli import main
from tokenbudget.cli.vlm_eval import budget_list
from tokenbudget.config.vlm import VisualTokens
from tokenbudget.evaluate.vlm_answers import first_line, load_vqa, normalise_answer
from tokenbudget.models.vlm import kv_cache_bytes
from tokenbudget.ops.visual_budget import visual_token_counts

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER", "ASSISTANT", ":", "question", "answer", "what",
         "color", "is", "it", "red", "blue", "green", "how", "many", "one", "two", "three", "?", "yes", "no",
         "shape", "round", "square", "big", "small"]  # fmt: skip
EOS = 2
SIDE, PATCH = 56, 14  # a 4x4 grid: 16 visual tokens per image (the class token dropped)
CHAT = "USER : <image> {question} ASSISTANT :"  # what the chat template below renders
TEMPLATE = "<image> question : {question} answer :"
QUESTIONS = ["what color is it ?", "how many ?", "what shape is it ?", "is it big ?"]
MAX_NEW = 4
#: the lines whose answer is the model's own; the others get an answer it cannot say
RIGHT = {0, 1, 3, 6, 9}
N_IMAGES = 3


def _save_tiny_llava(root: Path) -> None:
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )  # fmt: skip
    chat = (
        "{% for m in messages %}{{ m['role'] | upper }} :{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %} <image>{% else %} {{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
    )
    images = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIDE,
        patch_size=PATCH,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=EOS,
        initializer_range=0.2,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=vocab["<image>"], vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).eval().save_pretrained(root)
    processor.save_pretrained(root)


def plain_answers(model_dir: Path, template: str, pairs: list[tuple[Path, str]], hook=None) -> list[str]:  # noqa: ANN001
    """What an unpatched greedy generate says to each (image, question), one at a time (no padding):
    the new tokens up to the end-of-sequence token, decoded, first line."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    handle = model.model.multi_modal_projector.register_forward_hook(hook) if hook else None
    answers = []
    with torch.no_grad():
        for image, question in pairs:
            inputs = processor(
                images=Image.open(image).convert("RGB"), text=template.replace("{question}", question),
                return_tensors="pt",
            )  # fmt: skip
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)[
                0, inputs["input_ids"].shape[1] :
            ]
            ids = ids.tolist()
            ids = ids[: ids.index(EOS)] if EOS in ids else ids
            answers.append(processor.tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0])
    if handle:
        handle.remove()
    return answers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The saved model, images, and question files whose right answers are known for each prompt."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared machine
    root = tmp_path_factory.mktemp("eval_vlm")
    model_dir = root / "model"
    _save_tiny_llava(model_dir)
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):  # different sizes: the processor resizes and crops them
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 60, 3), dtype=np.uint8)).save(
            root / "img" / f"{i}.png"
        )
    lines = [(f"img/{i % N_IMAGES}.png", QUESTIONS[i % len(QUESTIONS)]) for i in range(10)]
    kinds = ["color" if i % 2 else "count" for i in range(len(lines))]
    pairs = [(root / image, question) for image, question in lines]
    files = {}
    for name, template in (("chat", CHAT), ("template", TEMPLATE)):
        said = plain_answers(model_dir, template, pairs)
        assert len(set(said)) > 1 and all(said), said  # answers that depend on the image and question
        answers = [s if i in RIGHT else "zebra" for i, s in enumerate(said)]
        records = [
            {"image": img, "question": q, "answer": a, "kind": k}
            for (img, q), a, k in zip(lines, answers, kinds, strict=True)
        ]
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    yield SimpleNamespace(root=root, model=model_dir, files=files, lines=lines, kinds=kinds, pairs=pairs)
    torch.set_num_threads(threads)


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["eval-vlm", *args, "--quiet", "--threads", "1"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _rows(capsys: pytest.CaptureFixture, *args: str) -> list[dict]:
    code, out, err = _run(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_full_accuracy_is_what_plain_generate_scores(
    tiny: SimpleNamespace, capsys: pytest.CaptureFixture
) -> None:
    rows = _rows(
        capsys, "--model", str(tiny.model), "--data", str(tiny.files["chat"]), "--methods", "full",
        "--batch-size", "3", "--max-new-tokens", str(MAX_NEW),
    )  # fmt: skip
    assert len(rows) == 1
    full = rows[0]
    n = len(tiny.lines)
    assert full["method"] == "full" and full["n"] == n
    assert full["accuracy"] == pytest.approx(len(RIGHT) / n)
    p = len(RIGHT) / n
    assert full["se"] == pytest.approx((p * (1 - p) / n) ** 0.5)
    for kind in ("color", "count"):
        lines = [i for i, k in enumerate(tiny.kinds) if k == kind]
        expected = sum(i in RIGHT for i in lines) / len(lines)
        assert full["per_kind"][kind]["accuracy"] == pytest.approx(expected)
        assert full["per_kind"][kind]["n"] == len(lines)
    assert full["visual_tokens"] == (SIDE // PATCH) ** 2
    assert full["relative"] == 1.0 and full["prefill_ratio"] == 1.0 and full["generate_ratio"] == 1.0
    assert full["kv_bytes"] > 0 and full["kv_ratio"] == 1.0
    for key in ("tokens", "seconds_per_question", "kv_visual_tokens", "config"):
        assert key in full


def test_a_tokenizer_without_pad_token_pads_with_its_eos(
    tiny: SimpleNamespace, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    bare = tmp_path / "no_pad"
    shutil.copytree(tiny.model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoProcessor.from_pretrained(bare).tokenizer.pad_token is None
    rows = _rows(
        capsys, "--model", str(bare), "--data", str(tiny.files["chat"]), "--methods", "full", "--batch-size", "3",
        "--max-new-tokens", str(MAX_NEW),
    )  # fmt: skip
    assert rows[0]["accuracy"] == pytest.approx(len(RIGHT) / len(tiny.lines))


def test_prompt_template_path(tiny: SimpleNamespace, capsys: pytest.CaptureFixture) -> None:
    args = (
        "--model",
        str(tiny.model),
        "--methods",
        "full",
        "--max-new-tokens",
        str(MAX_NEW),
        "--batch-size",
        "4",
    )
    rows = _rows(capsys, *args, "--data", str(tiny.files["template"]), "--prompt", TEMPLATE)
    assert rows[0]["accuracy"] == pytest.approx(len(RIGHT) / len(tiny.lines))
    # the chat answers asked with the template prompt score what plain generate says they score
    said = plain_answers(tiny.model, TEMPLATE, tiny.pairs)
    chat_answers = [json.loads(line)["answer"] for line in tiny.files["chat"].read_text().splitlines()]
    expected = np.mean(
        [normalise_answer(s) == normalise_answer(a) for s, a in zip(said, chat_answers, strict=True)]
    )
    rows = _rows(capsys, *args, "--data", str(tiny.files["chat"]), "--prompt", TEMPLATE)
    assert rows[0]["accuracy"] == pytest.approx(expected)


def test_limit_table_and_out(tiny: SimpleNamespace, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    code, text, err = _run(
        capsys, "--model", str(tiny.model), "--data", str(tiny.files["chat"]), "--methods", "full", "--limit", "4",
        "--max-new-tokens", str(MAX_NEW), "--out", str(out), "--no-timing",
    )  # fmt: skip
    assert code == 0, err
    assert text.splitlines()[0].split()[:4] == ["method", "tokens", "n", "accuracy"]
    assert "color" in text.splitlines()[0] and text.splitlines()[2].split()[0] == "full"
    rows = json.loads(out.read_text())
    assert rows[0]["n"] == 4 and rows[0]["accuracy"] == pytest.approx(len(RIGHT & set(range(4))) / 4)
    assert rows[0]["prefill_ratio"] is None and rows[0]["generate_ratio"] == 1.0


def test_llava_conversations(tiny: SimpleNamespace, capsys: pytest.CaptureFixture) -> None:
    answers = [json.loads(line)["answer"] for line in tiny.files["chat"].read_text().splitlines()]
    records = [
        {
            "image": tiny.lines[2 * r][0],
            "conversations": [
                {"from": "human", "value": "<image>\n" + tiny.lines[2 * r][1]},
                {"from": "gpt", "value": answers[2 * r]},
                {"from": "human", "value": tiny.lines[2 * r + 1][1]},
                {"from": "gpt", "value": answers[2 * r + 1]},
            ],
        }
        for r in range(2)
    ]
    # the same image for both questions of a conversation: line 1's own image is another
    path = tiny.root / "conversations.json"
    path.write_text(json.dumps(records))
    items = load_vqa(path)
    assert [i.question for i in items] == [q for _, q in tiny.lines[:4]]
    assert [i.answer for i in items] == answers[:4] and items[0].kind is None
    assert items[1].image == tiny.root / tiny.lines[0][0]
    said = plain_answers(tiny.model, CHAT, [(i.image, i.question) for i in items])
    expected = np.mean(
        [normalise_answer(s) == normalise_answer(i.answer) for s, i in zip(said, items, strict=True)]
    )
    rows = _rows(capsys, "--model", str(tiny.model), "--data", str(path), "--methods", "full",
                 "--max-new-tokens", str(MAX_NEW))  # fmt: skip
    assert rows[0]["accuracy"] == pytest.approx(expected) and rows[0]["per_kind"] == {}
    jsonl = tiny.root / "conversations.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [(i.image, i.question, i.answer) for i in load_vqa(jsonl)] == [
        (i.image, i.question, i.answer) for i in items
    ]


# -- a stand-in method, driven through the same tb.vlm_config / tb.apply / tb.remove / tb.last_state calls


@dataclass(frozen=True)
class StandIn(VisualTokens):
    """Zeroes each image's projected features past its first ``tokens`` (a stand-in for a real cut)."""


def _kept(config: StandIn, available: int) -> int:
    return visual_token_counts(config.tokens, [available])[0]


def _zero_after(k: int):  # noqa: ANN202 - a forward hook
    def hook(module, inputs, out):  # noqa: ANN001, ANN202
        out = out.clone()
        out[:, k:] = 0  # [images, tokens, hidden]
        return out

    return hook


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Route ``standin`` through the patch API; returns the log of apply/remove calls."""
    log: list[str] = []
    live: dict[int, tuple] = {}

    def vlm_config(method: str, tokens: int | float) -> StandIn | None:
        if method == "full":
            return None
        if method != "standin":
            raise ValueError(f"unknown VLM method {method!r}; choose from full, standin")
        return StandIn(tokens=tokens)

    def apply(model, config):  # noqa: ANN001, ANN202
        projector = model.model.multi_modal_projector
        k = _kept(
            config,
            model.config.vision_config.image_size // PATCH * (model.config.vision_config.image_size // PATCH),
        )
        seen = []
        handle = projector.register_forward_hook(
            lambda m, i, o: (seen.append(o.shape[0]), _zero_after(k)(m, i, o))[1]
        )
        live[id(model)] = (handle, k, seen)
        log.append("apply")
        return model

    def remove(model):  # noqa: ANN001, ANN202
        live.pop(id(model))[0].remove()
        log.append("remove")
        return model

    def last_state(model):  # noqa: ANN001, ANN202
        _, k, seen = live[id(model)]
        return SimpleNamespace(visual_tokens=[k] * seen[-1])

    monkeypatch.setattr(tokenbudget.config.vlm, "vlm_config", vlm_config, raising=False)
    for name, fn in (("apply", apply), ("remove", remove), ("last_state", last_state)):
        monkeypatch.setattr(tokenbudget.patch, name, fn)
    return log


def test_method_rows_against_full(
    tiny: SimpleNamespace, capsys: pytest.CaptureFixture, stand_in: list
) -> None:
    rows = _rows(
        capsys, "--model", str(tiny.model), "--data", str(tiny.files["chat"]), "--methods", "full,standin",
        "--tokens", "0.5,2", "--batch-size", "4", "--max-new-tokens", str(MAX_NEW),
    )  # fmt: skip
    assert [(r["method"], r["tokens"]) for r in rows] == [("full", 1.0), ("standin", 0.5), ("standin", 2)]
    assert isinstance(rows[2]["tokens"], int)
    batches = 3  # 10 questions in batches of 4
    assert stand_in == ["apply", "remove"] * (2 * batches)  # removed after every batch of every row
    full, half, two = rows
    assert full["accuracy"] == pytest.approx(len(RIGHT) / len(tiny.lines))  # the patch never leaks into full
    assert (half["visual_tokens"], two["visual_tokens"]) == (8, 2)
    said = plain_answers(tiny.model, CHAT, tiny.pairs, hook=_zero_after(2))
    answers = [json.loads(line)["answer"] for line in tiny.files["chat"].read_text().splitlines()]
    expected = np.mean(
        [normalise_answer(s) == normalise_answer(a) for s, a in zip(said, answers, strict=True)]
    )
    assert two["accuracy"] == pytest.approx(expected)
    assert two["relative"] == pytest.approx(expected / full["accuracy"])
    assert two["config"] == {"method": "", "tokens": 2, "allocation": "fixed"}
    for row in (half, two):
        assert row["prefill_ratio"] > 0 and row["generate_ratio"] > 0
        assert row["kv_ratio"] == pytest.approx(1.0)  # zeroing cuts nothing: the same cache


# -- pieces and bad input


def test_normalise_and_first_line() -> None:
    assert normalise_answer("The  Red cube.") == "red cube"
    assert normalise_answer("An apple, a pear!") == "apple pear"
    assert normalise_answer("theory") == "theory"  # articles only as whole words
    assert first_line("  two\nthree") == "two"


def test_kv_cache_bytes() -> None:
    keys = [torch.zeros(2, 1, 7 - i, 16) for i in range(3)]  # layers may hold fewer entries
    expected = 2 * sum(k.numel() for k in keys) * 4
    assert kv_cache_bytes([(k, k.clone()) for k in keys]) == expected
    assert (
        kv_cache_bytes(SimpleNamespace(layers=[SimpleNamespace(keys=k, values=k) for k in keys])) == expected
    )
    with pytest.raises(ValueError, match="use_cache"):
        kv_cache_bytes(None)


def test_budget_list() -> None:
    assert budget_list("0.5,0.25,64") == [0.5, 0.25, 64]
    assert budget_list("1.0,1") == [1.0, 1] and isinstance(budget_list("1")[0], int)
    for bad in ("0", "1.5", "-2", "abc", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            budget_list(bad)


@pytest.mark.parametrize("tokens", ["0", "1.5", "abc"])
def test_bad_tokens_exit_with_a_message(
    tiny: SimpleNamespace, capsys: pytest.CaptureFixture, tokens: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-vlm", "--model", str(tiny.model), "--data", str(tiny.files["chat"]), "--tokens", tokens])
    assert exit_info.value.code == 2
    assert "fraction in (0, 1]" in capsys.readouterr().err


def _error(capsys: pytest.CaptureFixture, *args: str) -> str:
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert err.startswith("tokenbudget eval-vlm: error:") and "Traceback" not in err
    return err


def test_bad_prompts(tiny: SimpleNamespace, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    base = ("--model", str(tiny.model), "--data", str(tiny.files["chat"]), "--methods", "full")
    assert "{question}" in _error(capsys, *base, "--prompt", "<image> say it")
    assert "'<image>'" in _error(capsys, *base, "--prompt", "question: {question}")
    bare = tmp_path / "no_chat"
    shutil.copytree(tiny.model, bare)
    (bare / "chat_template.jinja").unlink()
    err = _error(capsys, "--model", str(bare), "--data", str(tiny.files["chat"]), "--methods", "full")
    assert "no chat template" in err and "--prompt" in err and "'<image>'" in err


def test_bad_data(tiny: SimpleNamespace, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    shutil.copytree(tiny.root / "img", tmp_path / "img")
    good = {"image": "img/0.png", "question": "how many ?", "answer": "two"}
    cases = {
        "missing.jsonl": ([good, {**good, "image": "img/nope.png"}], "nope.png does not exist"),
        "malformed.jsonl": ([good, "{not json"], "line 2: not a JSON object"),
        "no_answer.jsonl": (
            [good, good, {"image": "img/0.png", "question": "q"}],
            "line 3: missing 'answer'",
        ),
        "empty.jsonl": ([], "holds no questions"),
    }
    for name, (lines, message) in cases.items():
        path = tmp_path / name
        path.write_text(
            "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
        )
        err = _error(capsys, "--model", str(tiny.model), "--data", str(path), "--methods", "full")
        assert message in err, err
    assert "no question file" in _error(
        capsys, "--model", str(tiny.model), "--data", str(tmp_path / "x.jsonl"), "--methods", "full"
    )


def test_bad_model_and_method(tiny: SimpleNamespace, capsys: pytest.CaptureFixture, tmp_path: Path, stand_in: list,
                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    data = ("--data", str(tiny.files["chat"]))
    err = _error(capsys, "--model", str(tiny.model), *data, "--methods", "full,nosuch")
    assert "'nosuch'" in err and "standin" in err and stand_in == []
    assert "no model directory" in _error(
        capsys, "--model", str(tmp_path / "none"), *data, "--methods", "full"
    )
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    assert "pip install 'tokenbudget[hf]'" in _error(
        capsys, "--model", str(tiny.model), *data, "--methods", "full"
    )


def test_real_methods_cut_and_a_refused_budget_leaves_the_others(
    tiny: SimpleNamespace, capsys: pytest.CaptureFixture
) -> None:
    """Every kind of cut through tb.vlm_config on the saved model: before the LLM (visionzip), inside
    the tower (tome) and inside the LLM (fastv); a count larger than an image's tokens is reported on
    its row and the other rows still run."""
    import warnings

    data = ("--model", str(tiny.model), "--data", str(tiny.files["chat"]), "--batch-size", "5")
    rows = _rows(capsys, *data, "--methods", "full,visionzip,tome,fastv", "--tokens", "0.5", "--no-timing")
    full, *cut = rows
    available = full["visual_tokens"]
    assert [r["method"] for r in cut] == ["visionzip", "tome", "fastv"]
    for row in cut:
        assert row["error"] is None and row["n"] == full["n"] and 0 <= row["accuracy"] <= 1
        assert row["visual_tokens"] == round(0.5 * available)  # what reached the LLM (fastv: from layer K)
    assert cut[2]["kv_visual_tokens"] == round(0.5 * available)
    assert cut[0]["kv_bytes"] < full["kv_bytes"]  # a shorter prompt, a smaller cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = _rows(
            capsys, *data, "--methods", "full,pool", "--tokens", f"{int(available) + 1},2", "--no-timing"
        )
    assert rows[1]["error"] is not None and "larger than" in rows[1]["error"] and rows[1]["accuracy"] is None
    assert rows[2]["error"] is None and rows[2]["visual_tokens"] == 2
    assert any("cannot run on this model" in str(w.message) for w in caught)
