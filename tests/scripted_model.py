"""The tiny model, fine-tuned for a few seconds to answer a handful of conversations in real harmony.

Random weights never write valid harmony, so they cannot show that the server turns the analysis
channel into reasoning, a `to=functions.*` message into a tool call, or that a tool result continues
the conversation. This is the same tiny gpt-oss (config, tokenizer, loader, every runtime path), with
its decoder layers fitted until greedy decoding reproduces `SCRIPT` exactly; the embeddings and lm_head
stay the random ones except lm_head's rows of the scripted tokens. Written once per cache
($GPTOSS_RUNTIME_CACHE) in the bf16 checkpoint layout (float32 values), then loaded like any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HI = [{"role": "user", "content": "hi"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
TOOL_RESULT = '{"sky":"sunny"}'
REASONING = {"low": "Greet.", "medium": "User greets. Reply.",
             "high": "The user says hi. I should greet them warmly and offer help."}
ANSWER = {"low": "Hello!", "medium": "Hello there!", "high": "Hello! How can I help you today?"}
CALL_REASONING, WEATHER_REASONING, WEATHER_ANSWER = "Need the weather tool.", "It is sunny.", "It is sunny in Paris."


def _final(reasoning: str, answer: str) -> str:
    return (f"<|channel|>analysis<|message|>{reasoning}<|end|><|start|>assistant<|channel|>final<|message|>"
            f"{answer}<|return|>")


def weather_followup(with_reasoning: bool) -> list[dict[str, Any]]:
    """The weather question, the model's tool call, and the tool's result (as a chat client sends it)."""
    call: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [CALL]}
    if with_reasoning:
        call["reasoning_content"] = CALL_REASONING
    return [*WEATHER, call, {"role": "tool", "tool_call_id": CALL["id"], "content": TOOL_RESULT}]


# (messages, reasoning effort, tools, the completion the model must write)
SCRIPT: list[tuple[list[dict[str, Any]], str, list[dict[str, Any]] | None, str]] = [
    *[(HI, effort, None, _final(REASONING[effort], ANSWER[effort])) for effort in ("low", "medium", "high")],
    (WEATHER, "medium", [TOOL],
     f"<|channel|>analysis<|message|>{CALL_REASONING}<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'),
    (weather_followup(True), "medium", [TOOL], _final(WEATHER_REASONING, WEATHER_ANSWER)),
    (weather_followup(False), "medium", [TOOL], _final(WEATHER_REASONING, WEATHER_ANSWER)),
]


def examples() -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of every scripted conversation."""
    from runtime import harmony

    enc = harmony.encoding()
    return [(harmony.render_prompt(msgs, effort, tools), enc.encode(target, allowed_special="all"))
            for msgs, effort, tools, target in SCRIPT]


def ensure_scripted_model(base: Path) -> Path:
    """The fitted checkpoint for the tiny checkpoint `base`, trained on first use (about a minute on CPU)."""
    from runtime import checkpoint

    key = hashlib.sha256(json.dumps([base.name, [(p, t) for p, t in examples()], 1]).encode()).hexdigest()[:12]
    out = checkpoint.cache_root() / "scripted" / f"tiny-scripted-{key}"
    if (out / "config.json").is_file():
        return out
    with checkpoint._file_lock(out.parent / f".{out.name}.lock"):
        if not (out / "config.json").is_file():
            _train(base, out)
    return out


def _train(base: Path, out: Path, max_steps: int = 600) -> None:
    import torch
    from safetensors.torch import save_file

    from runtime import checkpoint, distributed
    from runtime import model as modeling

    log.info("fitting the tiny model to the scripted conversations (once; cached in %s)", out)
    torch.manual_seed(0)
    hf = checkpoint.read_config(base)
    layout = distributed.make_layout(1, 1, 1, world=(1, 0, 0))
    model = modeling.build(base, hf, layout, distributed.Groups(), torch.device("cpu"), torch.float32, "eager",
                           "grouped_mm").model
    model.train()
    for name, p in model.named_parameters():  # the vocabulary matrices stay as they are (they are large)
        p.requires_grad_(not name.startswith(("model.embed_tokens", "lm_head")))
    data = examples()
    width = max(len(p) + len(t) for p, t in data)
    ids = torch.zeros(len(data), width, dtype=torch.long)
    mask = torch.zeros(len(data), width, dtype=torch.long)
    rows, cols, labels = [], [], []
    for i, (prompt, target) in enumerate(data):
        seq = prompt + target
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for j, t in enumerate(target):  # the logits at position p predict token p + 1
            rows.append(i)
            cols.append(len(prompt) + j - 1)
            labels.append(t)
    rows_t, cols_t, labels_t = torch.tensor(rows), torch.tensor(cols), torch.tensor(labels)
    vocab = torch.tensor(sorted(set(labels)))  # the scripted tokens: their lm_head rows are trained
    target = torch.searchsorted(vocab, labels_t)
    head = model.lm_head.weight  # [V, H]
    delta = torch.zeros(len(vocab), head.shape[1], requires_grad=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad] + [delta], lr=1e-2)
    for step in range(max_steps):
        hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[rows_t, cols_t]
        with torch.no_grad():  # the strongest other token of the whole vocabulary, per position
            full = hidden @ head.T
            full[:, vocab] = float("-inf")
            rival = full.argmax(-1)
        mine = hidden @ (head[vocab] + delta).T  # [N, k]
        rivals = (hidden * head[rival]).sum(-1, keepdim=True)  # [N, 1]
        logits = torch.cat([mine, rivals], dim=-1)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            right = logits.gather(1, target[:, None])
            margin = (right - logits.scatter(1, target[:, None], float("-inf")).amax(1, keepdim=True)).min()
        if margin > 2.0:
            break
    else:
        raise RuntimeError(f"the scripted model did not fit in {max_steps} steps (margin {float(margin):.3f})")
    log.info("fitted in %d steps (loss %.4f, smallest margin %.2f)", step + 1, loss.item(), margin.item())
    with torch.no_grad():
        head[vocab] += delta
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("quantization_config", None)  # plain (float) expert matrices now
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (base / name).is_file():
            shutil.copyfile(base / name, tmp / name)
    _verify(tmp, data)
    tmp.rename(out)


def _verify(ckpt: Path, data: list[tuple[list[int], list[int]]]) -> None:
    """Greedy decoding through the runtime's own path writes every scripted completion exactly."""
    from runtime import compose
    from runtime.engine import Engine

    engine = Engine(compose("generate", ["model.device=cpu", "model.synthetic=false", f"model.path={ckpt}"]))
    for prompt, target in data:
        got = engine.decode([prompt], len(target)).tokens[0, : len(target)].tolist()
        if got != target:
            raise RuntimeError(f"the scripted model writes {got} instead of {target}")
