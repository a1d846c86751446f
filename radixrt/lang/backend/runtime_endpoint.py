"""RuntimeEndpoint: programs on a `radixrt serve` (or SGLang) server through its native `/generate`.

    POST /generate {text | input_ids, sampling_params, stream, return_logprob, logprob_start_len}
      -> {"text", "output_ids", "meta_info": {prompt_tokens, cached_tokens, finish_reason,
                                              input_token_logprobs: [[logprob, id, text], ...]}}

`select` tokenizes locally when the server's tokenizer folder is readable from here (a
`Runtime` on this machine, the usual case), else through the server's `/v1/tokenize`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx

from radixrt.lang import chat_template
from radixrt.lang.backend import scoring
from radixrt.lang.backend.base import BaseBackend
from radixrt.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from radixrt.lang.errors import BackendError
from radixrt.lang.ir import SglSamplingParams

log = logging.getLogger(__name__)

NAMED_TEMPLATES = {"chatml": chat_template.CHATML, "default": chat_template.DEFAULT}


class RuntimeEndpoint(BaseBackend):
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        verify: Any = None,
        chat_template_name: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, verify=True if verify is None else verify
        )
        self.model_info = self._request("GET", "/get_model_info")
        self.tokenizer = _local_tokenizer(self.model_info.get("tokenizer_path") or self.model_info.get("model_path"))
        if chat_template_name is not None:
            if chat_template_name not in NAMED_TEMPLATES:
                raise ValueError(f"chat_template_name must be one of {', '.join(NAMED_TEMPLATES)}")
            self.chat_template = NAMED_TEMPLATES[chat_template_name]
        elif self.tokenizer is not None:
            self.chat_template = chat_template.from_tokenizer(self.tokenizer)
        else:
            log.warning("cannot read the server's tokenizer here; role blocks use ChatML (pass chat_template_name)")
            self.chat_template = chat_template.CHATML

    def get_model_name(self) -> str:
        return self.model_info.get("model_path", "")

    # ----- generation --------------------------------------------------------------------

    def generate(self, s, sampling_params: SglSamplingParams) -> tuple[str | list[str], Any]:
        """The text and its meta info; for n > 1, the n texts and their meta infos."""
        obj = self._request("POST", "/generate", json=_body(s.text_, sampling_params))
        if isinstance(obj, list):
            return [o["text"] for o in obj], [o["meta_info"] for o in obj]
        return obj["text"], obj["meta_info"]

    def generate_stream(self, s, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict[str, Any]]]:
        body = dict(_body(s.text_, sampling_params), stream=True)
        sent = 0
        try:
            with self.client.stream("POST", "/generate", json=body) as res:
                if res.status_code != 200:
                    res.read()
                    self._raise(res)
                for line in res.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise BackendError(f"{self.base_url}/generate failed: {event['error']}")
                    text = event["text"]  # the whole text so far
                    yield text[sent:], event["meta_info"]
                    sent = len(text)
        except httpx.TransportError as exc:
            raise BackendError(f"lost the radixrt server at {self.base_url}: {exc}") from exc

    # ----- select ------------------------------------------------------------------------

    def select(
        self, s, choices: list[str], temperature: float, choices_method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        scoring.check_select(choices, temperature)
        items = scoring.split_choices(self._encode, s.text_, choices)
        conditional = self._prompt_logprobs([it.ids for it in items], [it.start for it in items])
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            unconditional = self._prompt_logprobs([it.choice_ids for it in items], [0] * len(items))
        return scoring.decide(choices, choices_method, conditional, unconditional)

    def _prompt_logprobs(self, prompts: list[list[int]], starts: list[int]) -> list[list[list[Any]]]:
        """Each prompt's `[logprob, id, text]` entries from its start on, in one batched request."""
        first = min(starts)
        body = {
            "input_ids": prompts,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "return_text_in_logprobs": True,
            "logprob_start_len": first,
        }
        results = self._request("POST", "/generate", json=body)
        out = []
        for start, r in zip(starts, results):
            entries = r["meta_info"]["input_token_logprobs"][start - first :]
            out.append([[lp if lp is not None else 0.0, t, text] for lp, t, text in entries])
        return out

    # ----- cache and server --------------------------------------------------------------

    def cache_prefix(self, prefix_str: str) -> None:
        if prefix_str:
            self._request("POST", "/generate", json={"text": prefix_str, "sampling_params": {"max_new_tokens": 0}})

    def flush_cache(self, empty_cache: bool = True) -> bool:
        """True once flushed; False when the server refused (requests running: a 400, as in SGLang)."""
        try:
            res = self.client.post("/flush_cache")
        except httpx.TransportError as exc:
            raise BackendError(f"cannot reach the radixrt server at {self.base_url}: {exc}") from exc
        if res.status_code not in (200, 400):
            self._raise(res)
        return res.status_code == 200

    def get_server_info(self) -> dict[str, Any]:
        return self._request("GET", "/get_server_info")

    def shutdown(self) -> None:
        self.client.close()

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self._request("POST", "/v1/tokenize", json={"prompt": text})["tokens"]

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            res = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise BackendError(f"cannot reach the radixrt server at {self.base_url}: {exc}") from exc
        if res.status_code != 200:
            self._raise(res)
        return res.json()

    def _raise(self, res: httpx.Response) -> None:
        try:
            detail = res.json()
            detail = detail.get("error", {}).get("message", detail) if isinstance(detail, dict) else detail
        except ValueError:
            detail = res.text
        raise BackendError(f"{res.request.method} {res.request.url.path} returned {res.status_code}: {detail}")


def _body(text: str, sp: SglSamplingParams) -> dict[str, Any]:
    body: dict[str, Any] = {"text": text, "sampling_params": sp.to_engine()}
    if sp.return_logprob:
        body["return_logprob"] = True
        body["top_logprobs_num"] = sp.top_logprobs_num or 0
        body["logprob_start_len"] = -1 if sp.logprob_start_len is None else sp.logprob_start_len
        body["return_text_in_logprobs"] = bool(sp.return_text_in_logprobs)
    return body


def _local_tokenizer(model_path: str | None):
    """The server's tokenizer, when its folder is on this machine (else None)."""
    if not model_path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except Exception:
        return None
