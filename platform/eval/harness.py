"""The `ttte2e` model backend of EleutherAI's lm-evaluation-harness (lm-eval 0.4.13).

Every request is answered with continued test-time training: a context is prefilled chunk by
chunk (the training forward, model/decode.py), and the continuation is scored or generated from
that state, the inner loop stepping at every chunk boundary it crosses. Requests that share a
context share its prefill (multiple-choice answers: one prefill per question). `mode=swa|full`
gives the baselines from the same weights. Contexts longer than the model's training length are
not truncated unless `max_length` is given: TTT carrying on past it is the method's point.

    python pipelines/lm_eval_harness.py --model ttte2e \
        --model_args pretrained=models:/ttt-e2e-3b@champion,mode=ttt --tasks ...

or in Python: lm_eval.simple_evaluate(model=TTTE2ELM(pretrained=...), tasks=[...]).

Importing this module registers the backend under the name `ttte2e`; lm-eval versions that
discover plugins find it through the `lm_eval.models` entry point (pyproject.toml).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ttte2e.model.decode import (
    MODES,
    _select_rows,
    decode_step,
    prefill,
    prefill_prompts,
    stream_generate,
)

NAME = "ttte2e"
# The harness's own backends first: a registry that already holds ours skips its lazy import of
# them, and `--model hf` would then be unknown.
importlib.import_module("lm_eval.models")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _batch_size(value) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        raise ValueError(
            "batch_size: give a number of rows (auto-tuning is not supported by the "
            "ttte2e backend: the memory of a row depends on its context length)"
        )
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return size


class TTTE2ELM(TemplateLM):
    """lm-eval model: loglikelihood, loglikelihood_rolling and generate_until with continued TTT.

    pretrained: a model folder, a training checkpoint, an s3:// copy of either, or models:/NAME@ALIAS
    | models:/NAME/VERSION (tracking_uri for the registry). tokenizer: a tokenizer.json (or a folder with one),
    when the model has none beside its config. mode: ttt | swa | full. max_length: truncate contexts (left)
    to this many tokens; default none. add_bos_token: start every context with BOS, as every
    training document does (default true).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        mode: str = "ttt",
        tokenizer: str | None = None,
        tracking_uri: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str = "float32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = True,
        model=None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise ValueError(
                f"ttte2e: unknown model_args {sorted(unknown)}; known: pretrained, "
                "mode, tokenizer, tracking_uri, device, dtype, max_length, "
                "max_gen_toks, add_bos_token"
            )
        if mode not in MODES:
            raise ValueError(f"ttte2e: mode={mode!r}; choose one of {', '.join(MODES)}")
        if dtype not in DTYPES:
            raise ValueError(f"ttte2e: dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
        self.batch_size_per_gpu = _batch_size(batch_size)
        self.mode = mode
        self.max_length = None if max_length in (None, "", "none") else int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type == "cuda" and not torch.cuda.is_available():
            # the harness's --device defaults to cuda
            raise ValueError(
                f"ttte2e: device {device!r} but torch sees no CUDA device here; pass --device cpu"
            )
        if model is None:
            if not pretrained:
                raise ValueError(
                    "ttte2e: model_args needs pretrained=<model folder | checkpoint | "
                    "s3://... | models:/NAME@ALIAS>"
                )
            from ttte2e.platform.registry.model_registry import load_model

            loaded = load_model(str(pretrained), tracking_uri)
            model, self.tokenizer = loaded.model, loaded.tokenizer
        else:  # an already loaded TTTModel (Python use)
            self.tokenizer = None
        if isinstance(tokenizer, str):  # a tokenizer.json, or a folder holding one
            from tokenizers import Tokenizer

            from ttte2e.platform.registry.serving import load_tokenizer

            path = Path(tokenizer)
            tokenizer = load_tokenizer(path) if path.is_dir() else Tokenizer.from_file(str(path))
        if tokenizer is not None:
            self.tokenizer = tokenizer
        if self.tokenizer is None:
            raise ValueError(
                f"ttte2e: {pretrained or 'the model'} has no tokenizer.json beside "
                "its config; pass tokenizer=PATH/tokenizer.json"
            )
        vocab = model.config.vocab_size
        if self.tokenizer.get_vocab_size() > vocab:
            raise ValueError(
                f"ttte2e: the tokenizer has {self.tokenizer.get_vocab_size()} ids, "
                f"the model's vocabulary {vocab}"
            )
        self.model = model.to(self._device, DTYPES[dtype]).eval()
        self.pretrained = str(pretrained) if pretrained else "model"

    # ---- what the harness asks of a model --------------------------------------------------------
    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self) -> int:
        # documents are separated by BOS in our data (no EOS): BOS is where a text ends
        return self.model.config.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.model.config.bos_token_id

    @property
    def tokenizer_name(self) -> str:
        return f"{self.pretrained}:tokenizer"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _context(self, ids: list[int], room: int = 0) -> list[int]:
        """BOS first (as in training), then left-truncated to max_length - room if asked."""
        if self.add_bos_token and (not ids or ids[0] != self.prefix_token_id):
            ids = [self.prefix_token_id] + list(ids)
        if self.max_length is not None:
            keep = self.max_length - room
            if keep < 1:
                raise ValueError(
                    f"max_length {self.max_length} leaves no room for a context "
                    f"before {room} continuation tokens"
                )
            ids = list(ids)[-keep:]
        return list(ids)

    # ---- loglikelihood: prefill each distinct context once, decode its continuations -------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i}: empty continuation (nothing to score)")
            by_context.setdefault(tuple(self._context(context, len(continuation))), []).append(
                (i, list(continuation))
            )
        results: list = [None] * len(requests)
        batch, rows = [], 0
        for context, members in sorted(by_context.items(), key=lambda kv: -len(kv[0])):
            batch.append((list(context), members))
            rows += len(members)
            if rows >= self.batch_size_per_gpu:
                self._score(batch, results)
                batch, rows = [], 0
        if batch:
            self._score(batch, results)
        for (pair, _, _), answer in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return results

    @torch.no_grad()
    def _score(self, batch, results) -> None:
        """Sum of log p(continuation | context) and whether greedy decoding yields it, for each
        continuation of the batch's contexts (each context prefilled once)."""
        continuations = [c for _, members in batch for _, c in members]
        longest = max(len(c) for c in continuations)
        state = prefill_prompts(self.model, [c for c, _ in batch], self.mode, reserve=longest)
        owner = torch.tensor(
            [j for j, (_, members) in enumerate(batch) for _ in members], device=self._device
        )
        state = _select_rows(state, owner)  # one row per continuation: a copy of its context's
        lengths = torch.tensor([len(c) for c in continuations], device=self._device)
        targets = torch.zeros(len(continuations), longest, dtype=torch.long, device=self._device)
        for r, c in enumerate(continuations):
            targets[r, : len(c)] = torch.tensor(c)
        logprob = torch.zeros(len(continuations), dtype=torch.float64, device=self._device)
        greedy = torch.ones(len(continuations), dtype=torch.bool, device=self._device)
        rows = torch.arange(len(continuations), device=self._device)
        logits = state.last_logits
        for t in range(longest):
            scoring = t < lengths
            token = targets[:, t]
            step = F.log_softmax(logits.double(), -1)[rows, token]
            logprob += torch.where(scoring, step, torch.zeros_like(step))
            greedy &= ~scoring | (logits.argmax(-1) == token)
            if t + 1 < longest:  # rows already scored take a padding token; their state is dropped
                logits = decode_step(self.model, state, token)
        members = [i for _, m in batch for i, _ in m]
        for i, lp, g in zip(members, logprob.tolist(), greedy.tolist()):
            results[i] = (lp, g)

    # ---- loglikelihood_rolling: a whole text's log-likelihood ----------------------------------
    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """One prefill over [BOS] + the text (TTT through all of it); with max_length, the harness's
        disjoint rolling windows of that length instead, each prefilled on its own."""
        out = []
        for request in requests:
            (text,) = request.args
            tokens = self.tok_encode(text)
            if self.max_length is None:
                windows = [([self.prefix_token_id], tokens)] if tokens else []
            else:
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(
                        tokens, self.prefix_token_id, self.max_length, 1
                    )
                ]
            total = 0.0
            for context, predicted in windows:
                ids = torch.tensor([context + predicted], device=self._device)
                _, nll = prefill(self.model, ids, self.mode)
                total -= float(nll[0, -len(predicted) :].double().sum())
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ---- generate_until: greedy or sampled continuations with continued TTT ---------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(
                i
            )
        out: list = [None] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            for start in range(0, len(members), self.batch_size_per_gpu):
                part = members[start : start + self.batch_size_per_gpu]
                texts = self._generate([requests[i].args[0] for i in part], dict(kwargs))
                for i, text in zip(part, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 0.0))
        temperature = temperature if do_sample else 0.0  # the harness's convention: greedy
        if do_sample and temperature == 0.0:
            temperature = 1.0
        top_p = float(gen_kwargs.pop("top_p", 1.0))
        seed = gen_kwargs.pop("seed", None)
        gen_kwargs.pop("max_length", None)
        if gen_kwargs:
            raise ValueError(
                f"ttte2e generate_until: unsupported generation arguments "
                f"{sorted(gen_kwargs)}; supported: until, max_gen_toks, do_sample, "
                "temperature, top_p, seed"
            )
        prompts = [self._context(self.tok_encode(c), max_new) for c in contexts]
        generated: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        finished = [False] * len(prompts)
        stream = stream_generate(
            self.model,
            prompts,
            max_new,
            self.mode,
            temperature,
            top_p,
            stop_tokens=(self.eot_token_id,),
            seed=seed,
        )
        for token in stream:
            for r, t in enumerate(token.tolist()):
                if finished[r]:
                    continue
                if t == self.eot_token_id:
                    finished[r] = True
                    continue
                generated[r].append(t)
                texts[r] = self.tok_decode(generated[r])
                finished[r] = any(s in texts[r] for s in until)
            if all(finished):
                break
        return [_cut(text, until) for text in texts]


def _cut(text: str, until: list[str]) -> str:
    """The text before the first stop string."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[: min(ends)] if ends else text


if NAME not in model_registry:
    register_model(NAME)(TTTE2ELM)


# ---- task scores for pipelines/evaluate.py -------------------------------------------------------
def write_tokenizer_folder(tokenizer, folder: Path) -> Path:
    """tokenizer.json + tokenizer_config.json in a folder: what RULER's tasks load through
    AutoTokenizer (they size their prompts in the model's tokens)."""
    from ttte2e.model.model_folder import write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, tokenizer.to_str().encode())
    return folder


def heldout_text_tasks(
    reader_uri: str, contexts: list[int], windows: int, folder: Path, tokenizer, seed: int = 0
) -> list[str]:
    """Local harness tasks `ttte2e_heldout_<context>`: loglikelihood_rolling over `windows`
    held-out windows of `context` tokens of a prepared dataset, decoded to text (the harness
    scores text; its word perplexity and bits per byte are comparable across tokenizers)."""
    from ttte2e.platform.data.stream import WindowReader

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for context in contexts:
        reader = WindowReader(reader_uri, "val", context, seed)
        n = min(windows, reader.windows_per_epoch)
        if n < 1:
            raise ValueError(f"{reader_uri}: no held-out window of {context} tokens")
        rows = reader.read(range(n))
        bos = reader.bos_id
        texts = [tokenizer.decode([int(t) for t in row[1:] if t != bos]) for row in rows]
        name = f"ttte2e_heldout_{context}"
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
            "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
            "  - metric: word_perplexity\n  - metric: byte_perplexity\n"
            "  - metric: bits_per_byte\n"
        )
        names.append(name)
    return names


def task_scores(
    model,
    tokenizer,
    tasks: list[str],
    modes: tuple[str, ...],
    work: Path,
    include_path: str | None = None,
    metadata: dict | None = None,
    limit: int | None = None,
    batch_size: int = 4,
) -> dict:
    """{mode: {task: {metric: value}}} from lm_eval.simple_evaluate, one backend per mode over
    the same weights."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tok_folder = write_tokenizer_folder(tokenizer, work / "tokenizer")
    manager = TaskManager(
        include_path=include_path, metadata={"tokenizer": str(tok_folder), **(metadata or {})}
    )
    out: dict = {}
    for mode in modes:
        lm = TTTE2ELM(
            model=model,
            tokenizer=tokenizer,
            mode=mode,
            batch_size=batch_size,
            device=str(next(model.parameters()).device),
        )
        result = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False
        )
        out[mode] = {
            task: {
                metric.split(",")[0]: value
                for metric, value in scores.items()
                if isinstance(value, (int, float)) and "stderr" not in metric and value != -1
            }  # RULER reports -1 for the lengths it did not run
            for task, scores in result["results"].items()
        }
    return out
