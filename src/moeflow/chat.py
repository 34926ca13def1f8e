"""`moeflow chat`: a terminal conversation with one engine, streamed token by token.

The whole conversation goes through the checkpoint's chat template each turn; the oldest turns are dropped
when it no longer fits the context. `/reset` forgets it, `/exit` (or end of input) leaves.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from moeflow import MoeflowError
from moeflow.engine.sequence import SamplingParams
from moeflow.flags import context_flag, device_flags, model_flag, sampling_flags

if TYPE_CHECKING:
    from moeflow.engine.llm_engine import LLMEngine

def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="chat in the terminal (streamed; /reset, /exit)")
    model_flag(c)
    c.add_argument("--system", help="system message")
    sampling_flags(c, 256, 0.7, 0.9, "sampled by default: conversation reads better")
    context_flag(c, "tokens of conversation kept, the oldest turns dropped (default: the model's context; with "
                 "--gpu-memory at most 4096)")
    device_flags(c)
    c.set_defaults(func=run)


def run(args) -> int:
    from moeflow.launch import load_engine

    engine = load_engine(args, 1)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    if params.max_new_tokens >= engine.max_len:
        raise MoeflowError(f"--max-new-tokens must be below the context ({engine.max_len})")
    return chat_loop(ChatSession(engine, params, args.system))


HELP = "type a message; /reset forgets the conversation, /exit (or Ctrl-D) leaves"


class ChatSession:
    def __init__(self, engine: LLMEngine, params: SamplingParams, system: str | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def fit(self) -> list[int]:
        """The conversation's prompt ids, dropping the oldest exchanges until it leaves room to answer."""
        room = self.engine.max_len - self.params.max_new_tokens
        while True:
            ids = self.engine.encode(self.messages())
            if len(ids) <= room or len(self.history) <= 1:
                break
            self.history = self.history[2:]  # one user turn and its answer
        if len(ids) > room:
            raise MoeflowError(f"the message takes {len(ids)} tokens; the context leaves {room} for a prompt")
        return ids

    def reply(self, text: str, out: TextIO) -> str:
        self.history.append({"role": "user", "content": text})
        try:
            ids = self.fit()
        except MoeflowError:
            self.history.pop()
            raise
        seq = self.engine.add_request(ids, self.params)
        try:
            while not seq.finished:
                for r in self.engine.step():
                    if r.seq_id == seq.id and r.text:
                        out.write(r.text)
                        out.flush()
        except KeyboardInterrupt:
            self.engine.abort(seq)  # keep what was said so far
        out.write("\n")
        if seq.finish_reason == "length":
            print(f"[reply cut at {len(seq.output_ids)} tokens: --max-new-tokens]", file=sys.stderr)
        self.history.append({"role": "assistant", "content": seq.text})
        return seq.text


def chat_loop(session: ChatSession, inp: TextIO | None = None, out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    interactive = inp.isatty()
    if interactive:
        e = session.engine
        print(f"[{e.ck.name} on {e.device.type}, context {e.max_len} tokens]", file=err)
        print(HELP, file=err)
    while True:
        try:
            if interactive:  # input() gives line editing and history where readline is available
                try:
                    line = input(">>> ") + "\n"
                except EOFError:  # Ctrl-D: leave the terminal on a new line
                    out.write("\n")
                    line = ""
            else:
                line = inp.readline()
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line:  # end of input
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            session.history.clear()
            print("[conversation reset]", file=err)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print(HELP, file=err)
            continue
        try:
            session.reply(text, out)
        except MoeflowError as e:
            print(f"moeflow: {e}", file=err)
