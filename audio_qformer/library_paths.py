# Copyright 2026 The audio-qformer authors. Licensed under the Apache License, Version 2.0.
"""Where a sound library's files are, and how it names them.

Files under the library's own folder (e.g. `LIB/sounds/`) make a library that can be copied or cloned whole, as a
Space does: they are recorded relative to it and keyed by their content, since a copy changes every path and
modification time. Other files are recorded by absolute path and keyed by path, size and modification time (no
reading).
"""

import os

from audio_qformer.identity import clip_key


class LibraryPaths:
    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)

    def inside(self, path: str) -> bool:
        return os.path.commonpath([os.path.abspath(path), self.directory]) == self.directory

    def key(self, path: str) -> str:
        """The key of the file at `path` as it is now (`identity.clip_key`)."""
        if not self.inside(path):
            return clip_key(path)
        with open(path, "rb") as handle:
            return clip_key(None, handle.read())

    def stored(self, path: str) -> str:
        """How the library records `path`: relative to its folder when inside it, else absolute."""
        return os.path.relpath(path, self.directory) if self.inside(path) else os.path.abspath(path)

    def absolute(self, stored: str) -> str:
        """The absolute path of a recorded one."""
        return os.path.abspath(os.path.join(self.directory, stored))


__all__ = ["LibraryPaths"]
