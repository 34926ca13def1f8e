"""ResultFile: the job's output JSONL, appended and flushed line by line, read back to resume.

Every finished request is one line written and flushed at once (fsync'd at intervals and on close), so a crash
or Ctrl-C loses no finished result and leaves whole lines; a torn last line (a kill mid-write) is found on the
next run and the file rewritten without it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from moeflow import MoeflowError
from moeflow.config import write_whole


class ResultFile:
    def __init__(self, path: str | Path, fsync_every_s: float = 2.0):
        self.path, self.fsync_every_s = Path(path), fsync_every_s
        if self.path.is_dir():
            raise MoeflowError(f"--output {self.path} is a folder")
        if not self.path.parent.is_dir():
            raise MoeflowError(f"--output {self.path}: the folder {self.path.parent} does not exist")
        self.done, self.dropped = self._recover()
        try:
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise MoeflowError(f"--output {self.path} cannot be written: {e.strerror}") from None
        self.written, self._synced = 0, time.monotonic()

    def _recover(self) -> tuple[set[str], int]:
        """custom_ids already written; rewrites the file without torn or unreadable lines (their count)."""
        if not self.path.exists():
            return set(), 0
        try:
            raw = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise MoeflowError(f"--output {self.path} cannot be read: {e.strerror}") from None
        good, done = [], set()
        lines = raw.split("\n")
        for text in lines:
            try:
                rec = json.loads(text)
            except ValueError:
                continue
            if isinstance(rec, dict) and "custom_id" in rec:
                good.append(text)
                if rec["custom_id"] is not None:
                    done.add(rec["custom_id"])
        dropped = sum(1 for t in lines if t.strip()) - len(good)
        if dropped or (raw and not raw.endswith("\n")):
            write_whole(self.path, "".join(t + "\n" for t in good), encoding="utf-8")
        return done, dropped

    def write(self, rec: dict) -> None:
        self.file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.file.flush()  # in the OS's hands: survives the process
        self.written += 1
        if time.monotonic() - self._synced >= self.fsync_every_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.file.fileno())  # on the disk: survives the machine
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            self.sync()
            self.file.close()

    def __enter__(self) -> ResultFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
