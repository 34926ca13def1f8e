"""`moeflow chat`: the conversation is kept through the chat template, /reset forgets it, /exit and EOF leave."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from moeflow.chat import ChatSession
from moeflow.checkpoint import load
from moeflow.cli import DEFAULT_MODEL, main
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams


def test_chat_keeps_the_conversation_and_resets(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n\nand again\n/reset\nhello there\n/exit\nunread\n"))
    rc = main(["chat", "--max-new-tokens", "6", "--temperature", "0", "--max-context", "256", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    engine = LLMEngine(load(DEFAULT_MODEL), max_seqs=1, max_len=256)
    p = SamplingParams(max_new_tokens=6)
    first = engine.generate([[{"role": "user", "content": "hello there"}]], p)[0].text
    second = engine.generate([[{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
                               {"role": "user", "content": "and again"}]], p)[0].text
    assert out == f"{first}\n{second}\n{first}\n"  # after /reset the first answer comes again


def test_old_turns_drop_when_the_context_fills():
    engine = LLMEngine(load(DEFAULT_MODEL), max_seqs=1, max_len=96)
    session = ChatSession(engine, SamplingParams(max_new_tokens=8, ignore_eos=True), system="be brief")
    out = io.StringIO()
    for i in range(6):
        session.reply(f"message number {i} with some more words in it", out)
        assert len(engine.encode(session.messages())) <= 96
    assert session.history[-2]["content"].startswith("message number 5") and len(session.history) < 12
    assert session.messages()[0]["role"] == "system" and len(engine.cache.free) == 1


def test_piped_stdin_to_eof():
    env = os.environ | {"PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "moeflow", "chat", "--max-new-tokens", "4", "--temperature", "0",
                           "--max-context", "128", "--device", "cpu"], input="hi\n", capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # one reply (the default model writes documentation, newlines included), then a clean exit at EOF
    assert proc.stdout.strip() and "Traceback" not in proc.stderr


def test_a_reply_cut_by_the_token_limit_says_so(capsys):
    engine = LLMEngine(load(DEFAULT_MODEL), max_seqs=1, max_len=96)
    session = ChatSession(engine, SamplingParams(max_new_tokens=3, ignore_eos=True))
    session.reply("hello", io.StringIO())
    assert "[reply cut at 3 tokens: --max-new-tokens]" in capsys.readouterr().err
