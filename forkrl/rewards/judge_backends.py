"""The judge's backends and its response cache (``rewards.judge``): a local causal LM (``LocalJudge``: choice
probabilities from one forward, or greedy replies), an OpenAI-compatible endpoint (``EndpointJudge``: retries with
backoff, bounded concurrency, the standard library's HTTP client), and ``Cache``, the append-only record of every
judgement received, by key (``cache_key``: the judge's identity, the exact text it was given, its settings)."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .judge import JudgeCfg

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- cache


class Cache:
    """Judgements by key, read from ``path`` at the first use and appended to after every batch."""

    def __init__(self, path: Path | None):
        self.path, self.entries, self.pending = path, None, []

    def _read(self) -> dict:
        out = {}
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    out[entry["key"]] = entry["value"]
                except (ValueError, KeyError, TypeError):  # a torn last line
                    continue
        return out

    def get(self, key: str):
        if self.entries is None:
            self.entries = self._read()
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        self.pending.append(json.dumps({"key": key, "value": value}) + "\n")

    def flush(self) -> None:
        if self.path is None or not self.pending:
            self.pending = []
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
            f.write((("\n" if torn else "") + "".join(self.pending)).encode())
            f.flush()
            os.fsync(f.fileno())
        self.pending = []


def cache_key(identity: dict, text: Any, settings: dict) -> str:
    return hashlib.sha256(json.dumps([identity, text, settings], sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- backends


class LocalJudge:
    """A local causal LM: choice probabilities from one forward, or greedy replies (``kind: hf``)."""

    def __init__(self, cfg: JudgeCfg, local: Path, device: str):
        self.cfg, self.local, self.device = cfg, local, device
        self.model = self.tokenizer = None
        # weights swapped in place change a file's size or time; a copy that keeps times (cp -p, rsync -a) is the
        # same judge, and a copy that does not just pays once more
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in local.glob("*.safetensors"))
        self.identity = {"kind": "hf", "path": str(local.resolve()), "files": files,
                         "config": hashlib.sha256((local / "config.json").read_bytes()).hexdigest()}

    def _tokenizer(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.local)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            self.tokenizer = tok
        return self.tokenizer

    def _model(self):
        if self.model is None:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.local, dtype=getattr(torch, self.cfg.dtype))
            self.model = model.to(self.device).eval()
        return self.model

    def chat_on(self) -> bool:
        return self.cfg.chat if self.cfg.chat is not None else bool(self._tokenizer().chat_template)

    def text(self, user: str) -> str:
        """What the model reads: the chat template's prompt up to the assistant's turn, or the plain text."""
        tok = self._tokenizer()
        if not self.chat_on():
            return user if self.cfg.system is None else f"{self.cfg.system}\n\n{user}"
        messages = ([{"role": "system", "content": self.cfg.system}] if self.cfg.system else []) + \
            [{"role": "user", "content": user}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def settings(self) -> dict:
        if self.cfg.how == "choice":
            return {"method": "choice", "choices": sorted(self.cfg.choices), "dtype": self.cfg.dtype}
        return {"method": "generate", "max_new_tokens": self.cfg.max_new_tokens, "dtype": self.cfg.dtype}

    def choice_ids(self) -> dict[str, int]:
        tok = self._tokenizer()
        ids = {c: tok(c, add_special_tokens=False).input_ids[0] for c in self.cfg.choices}
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"the judge's choices {list(ids)} share a first token ({ids}); choose words whose "
                             "first tokens differ")
        return ids

    def _encode(self, texts: list[str]) -> list[list[int] | None]:
        tok = self._tokenizer()
        rows = [tok(t, add_special_tokens=not self.chat_on()).input_ids for t in texts]  # a template has its own
        limit = self.cfg.max_length
        return [r if r and (limit is None or len(r) <= limit) else None for r in rows]

    def judge(self, texts: list[str]):
        """(index, the choices' probabilities (method choice) or the greedy reply (generate)) of every text, batch
        by batch; None for a text longer than max_length."""
        rows = self._encode(texts)
        yield from ((i, None) for i, r in enumerate(rows) if r is None)
        todo = sorted((i for i, r in enumerate(rows) if r is not None), key=lambda i: len(rows[i]))  # less padding
        step = self.choose if self.cfg.how == "choice" else self.generate
        for start in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[start:start + self.cfg.batch_size]
            yield from zip(chunk, step([rows[i] for i in chunk]))

    def choose(self, rows: list[list[int]]) -> list[dict[str, float]]:
        """Softmax over the choices' first tokens at the position after each row (right-padded: exact)."""
        import torch

        ids = self.choice_ids()
        model, width = self._model(), max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
        last = logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])].float()
        probs = torch.softmax(last[:, list(ids.values())], dim=-1).cpu().tolist()
        return [dict(zip(ids, p)) for p in probs]

    def generate(self, rows: list[list[int]]) -> list[str]:
        """Greedy replies (left-padded, as generation needs)."""
        import torch

        model, tok, width = self._model(), self.tokenizer, max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                 do_sample=False, max_new_tokens=self.cfg.max_new_tokens,
                                 pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)


class RequestFailed(Exception):
    """An endpoint request that failed after its retries (the row is unscorable; nothing is cached)."""


RETRY_STATUS = {408, 409, 429}  # and every 5xx


class EndpointJudge:
    """An OpenAI-compatible ``/chat/completions`` endpoint, asked at most ``max_concurrency`` at a time with
    retries and exponential backoff (``kind: openai``)."""

    def __init__(self, cfg: JudgeCfg, key: str | None):
        self.cfg, self.key = cfg, key
        self.url = cfg.base_url.rstrip("/")
        self.identity = {"kind": "openai", "base_url": self.url, "model": cfg.model}

    def headers(self) -> dict:
        auth = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return {"Content-Type": "application/json", **auth}

    def text(self, user: str) -> list[dict]:
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        return system + [{"role": "user", "content": user}]

    def settings(self) -> dict:
        return {"temperature": 0, "max_tokens": self.cfg.max_new_tokens, **self.cfg.extra_body}

    def request(self, messages: list[dict]) -> str:
        """The reply's text; RequestFailed after the retries, or at once for a reply that is not retried."""
        body = json.dumps({"model": self.cfg.model, "messages": messages, **self.settings()}).encode()
        url, error, after = f"{self.url}/chat/completions", None, None
        for attempt in range(self.cfg.retries + 1):
            if attempt:  # the server's Retry-After (at most a minute) where it gives one
                time.sleep(after if after is not None else self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(url, data=body, headers=self.headers(), method="POST")
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code} {e.reason}"
                if e.code not in RETRY_STATUS and e.code < 500:
                    raise RequestFailed(f"{url}: {error}: {e.read()[:300].decode(errors='replace')}") from None
                wait = (e.headers.get("Retry-After") or "") if e.headers else ""
                after = min(float(wait), 60.0) if wait.replace(".", "", 1).isdigit() else None
                continue
            except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:  # refused, reset,
                error, after = f"{type(e).__name__}: {getattr(e, 'reason', e)}", None  # timed out, cut short
                continue
            try:
                content = json.loads(raw)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise RequestFailed(f"{url}: a reply that is not a chat completion: {raw[:200]!r}") from None
            if not isinstance(content, str):
                raise RequestFailed(f"{url}: a reply without text content ({content!r})")
            return content
        raise RequestFailed(f"{url}: {error} (after {self.cfg.retries + 1} attempts; timeout_s "
                            f"{self.cfg.timeout_s:g})")

    def judge(self, texts: list[list[dict]]):
        """(index, reply or RequestFailed) for every text, as each request finishes."""
        pool = ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, max(len(texts), 1)))
        try:
            futures = {pool.submit(self.request, t): i for i, t in enumerate(texts)}
            for f in as_completed(futures):
                e = f.exception()
                yield futures[f], (e if e is not None else f.result())
        finally:  # a time limit that fires here leaves the requests still in flight to finish on their own
            pool.shutdown(wait=False, cancel_futures=True)

    def probe(self, where: str, env: str | None) -> None:
        """GET {base_url}/models once, briefly: an unreachable endpoint or a rejected key is a config error."""
        from .api import RewardError

        url = f"{self.url}/models"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=self.headers()),
                                        timeout=min(5.0, self.cfg.timeout_s)):
                return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise RewardError(f"{where}.judge: {url} refused the key (HTTP {e.code}) "
                                  f"{'from $' + env if env else '(none sent: set api_key_env)'}; check it") from None
            return  # it answers: some servers have no /models
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RewardError(f"{where}.judge: cannot reach the judge endpoint {url} "
                              f"({getattr(e, 'reason', e)}); check base_url and that the server is up") from None
