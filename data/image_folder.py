"""A user's own photo folder: find the images under it (recursively) and load them for the search index.

`scan_image_folder` lists every image file under a root with its size, modification time and inode number, which
is what the index compares to tell new, changed and deleted files apart (as `make` and `rsync` do: no content
hash, so an incremental run reads only the files that changed; the inode catches a file replaced by another one,
a hard link included, that happens to have the same size and mtime). `ImageFolderDataset` loads listed files with the
evaluation transform; a file that cannot be decoded yields an error message instead of raising, so one bad
photo is reported and skipped instead of stopping a run over a million; that includes a decompression bomb
(a small file declaring more pixels than PIL's `Image.MAX_IMAGE_PIXELS` limit allows).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from data.retrieval import DataError, load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageFile:
    """One image under the root: `path` relative to it (always with '/'), `size` in bytes, `mtime_ns`, and the
    inode number `ino` (None when unknown: indexes written before it was recorded)."""

    path: str
    size: int
    mtime_ns: int
    ino: int | None = None

    @property
    def version(self) -> tuple[int, int, int | None]:
        """What identifies this version of the file: (size, mtime_ns, ino)."""
        return self.size, self.mtime_ns, self.ino


def same_version(recorded: tuple, current: tuple) -> bool:
    """True when a recorded (size, mtime_ns, ino) describes the current one; an unknown recorded inode (None)
    matches any, so that an index written before inodes were recorded is not re-embedded whole."""
    size, mtime_ns, ino = recorded
    return (size, mtime_ns) == tuple(current[:2]) and (ino is None or ino == current[2])


def read_image(path: str):
    """`data.retrieval.load_image`, with a decompression bomb reported as a DataError like any unreadable file."""
    try:
        return load_image(path)
    except Image.DecompressionBombError as err:  # not an OSError: load_image lets it through
        raise DataError(f"Could not read image file {path}: DecompressionBombError: {err}") from err


def is_inside(root: str, path: str) -> bool:
    """True when `path`, with every symlink resolved, lies inside the directory `root` (also resolved)."""
    root, path = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([root, path]) == root and path != root


def scan_image_folder(root: str) -> tuple[list[ImageFile], list[str]]:
    """Every image file under `root` (by extension, case-insensitive), sorted by path, and the paths skipped.

    Hidden files and folders (names starting with '.') are not entered. Symlinks are followed only when their
    target lies inside `root`: a link pointing elsewhere is skipped (and listed), so that nothing outside the
    folder ever enters the index or the web server.
    """
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root!r} (--images must be an existing directory)")
    found, skipped = [], []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full) and not is_inside(root, full):
                skipped.append(f"{rel}: a symlink to a file outside the folder")
                continue
            try:
                st = os.stat(full)
            except OSError as err:  # a dangling symlink, or a file removed while scanning
                skipped.append(f"{rel}: {err.strerror}")
                continue
            found.append(ImageFile(rel, st.st_size, st.st_mtime_ns, st.st_ino))
    found.sort(key=lambda f: f.path)
    return found, skipped


class ImageFolderDataset(Dataset):
    """Images `paths` (relative to `root`) through `transform`. Items are (image tensor, position, error):
    for a file that cannot be read the tensor is zeros and `error` says why ('' when the image loaded)."""

    def __init__(self, root: str, paths: list[str], transform, image_size: int):
        self.root, self.paths, self.transform, self.image_size = root, paths, transform, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = read_image(os.path.join(self.root, self.paths[index]))
        except DataError as err:
            return torch.zeros(3, self.image_size, self.image_size), index, str(err)
        return self.transform(image), index, ""
