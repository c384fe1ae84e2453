"""Dataset downloads that several processes of one machine may ask for at once (the workers of one node, each
given ``--download``): the first one fetches the dataset, the others wait for it and find it there.

Under a lock in the data folder (``.raydistill-download.lock``) the archive is downloaded and extracted into a
``.partial-*`` folder beside the dataset, checked (torchvision's md5 of the archive and, where known, of each
file), and only then renamed into place: the dataset folder is complete or absent. A download that fails or
is killed leaves at most its ``.partial-*`` folder, which no loader reads and the next download deletes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from . import storage
from .errors import UsageError, first_line

LOCK = ".raydistill-download.lock"
PARTIAL = ".partial-"


def fetch(url: str, md5: str | None, data_dir: Path, folder: str, *, what: str, hint: str,
          complete: Callable[[Path], bool], file_md5s: Sequence[tuple[str, str]] = ()) -> None:
    """Make ``data_dir/folder`` hold dataset ``what``, extracted from the archive at ``url`` (md5 ``md5``),
    unless ``complete(data_dir/folder)`` finds it there once the lock is held. ``file_md5s``: (name, md5) of
    files of ``folder`` checked before it is put in place. Failures are one-line UsageErrors ending in ``hint``.
    """
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    dest = data_dir / folder
    try:
        with storage.file_lock(data_dir / LOCK):
            if complete(dest):  # another process of this machine fetched it while this one waited
                return
            for old in data_dir.glob(PARTIAL + "*"):  # left by a download that failed or was killed
                shutil.rmtree(old, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=PARTIAL, dir=data_dir))
            try:
                download_and_extract_archive(url, download_root=str(tmp), md5=md5, remove_finished=True)
                bad = [name for name, digest in file_md5s if not check_integrity(str(tmp / folder / name), digest)]
                if not (tmp / folder).is_dir() or bad:
                    raise UsageError(f"the {what} archive from {url} has no {folder}/ or files failing their md5 "
                                     f"check ({', '.join(bad) or folder}); {hint}")
                if dest.exists():  # an incomplete folder (files missing): replaced as a whole
                    os.replace(dest, tmp / "replaced")
                os.replace(tmp / folder, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except UsageError:
        raise
    except Exception as exc:  # network, archive and file-system errors come in many types; all mean the same here
        raise UsageError(f"could not download {what} into --data-dir {data_dir} from {url} ({first_line(exc)}); "
                         f"{hint}") from None
