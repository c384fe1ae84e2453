"""Dataset downloads that several processes of one machine may ask for at once (the workers of one node, each
given ``--download``): the first one fetches the dataset, the others wait for it and find it there.

Under a lock in the data folder (``.raydistill-download.lock``) the dataset is downloaded (an archive, extracted:
``fetch``; or single files, each from the first of its mirrors that answers: ``fetch_files``) into a
``.partial-*`` folder beside the dataset, checked (torchvision's md5 of the archive and, where known, of each
file; or a caller's check of the files' contents), and only then renamed into place: the dataset folder is
complete or absent. A download that fails or is killed leaves at most its ``.partial-*`` folder, which no loader
reads and the next download deletes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from . import storage
from .errors import UsageError, first_line

LOCK = ".raydistill-download.lock"
PARTIAL = ".partial-"


@contextlib.contextmanager
def _staged(data_dir: Path, folder: str, complete: Callable[[Path], bool], what: str, source: str,
            hint: str) -> Iterator[Path | None]:
    """Under the lock: ``None`` when ``complete(data_dir/folder)`` finds the dataset there (another process
    fetched it while this one waited), else a fresh ``.partial-*`` folder to fill with ``folder`` inside;
    once the block ends without an error it is renamed into place (an incomplete folder there replaced whole).
    Failures are one-line UsageErrors ending in ``hint``."""
    dest = data_dir / folder
    try:
        with storage.file_lock(data_dir / LOCK):
            if complete(dest):
                yield None
                return
            for old in data_dir.glob(PARTIAL + "*"):  # left by a download that failed or was killed
                shutil.rmtree(old, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=PARTIAL, dir=data_dir))
            try:
                yield tmp
                if dest.exists():  # an incomplete folder (files missing): replaced as a whole
                    os.replace(dest, tmp / "replaced")
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / folder, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except UsageError:
        raise
    except Exception as exc:  # network, archive and file-system errors come in many types; all mean the same here
        raise UsageError(f"could not download {what} into --data-dir {data_dir} from {source} ({first_line(exc)}); "
                         f"{hint}") from None


def fetch(url: str, md5: str | None, data_dir: Path, folder: str, *, what: str, hint: str,
          complete: Callable[[Path], bool], file_md5s: Sequence[tuple[str, str]] = ()) -> None:
    """Make ``data_dir/folder`` hold dataset ``what``, extracted from the archive at ``url`` (md5 ``md5``),
    unless ``complete(data_dir/folder)`` finds it there once the lock is held. ``file_md5s``: (name, md5) of
    files of ``folder`` checked before it is put in place. Failures are one-line UsageErrors ending in ``hint``.
    """
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    with _staged(data_dir, folder, complete, what, url, hint) as tmp:
        if tmp is None:
            return
        download_and_extract_archive(url, download_root=str(tmp), md5=md5, remove_finished=True)
        bad = [name for name, digest in file_md5s if not check_integrity(str(tmp / folder / name), digest)]
        if not (tmp / folder).is_dir() or bad:
            raise UsageError(f"the {what} archive from {url} has no {folder}/ or files failing their md5 "
                             f"check ({', '.join(bad) or folder}); {hint}")


def fetch_files(files: Sequence[str], mirrors: Sequence[str], data_dir: Path, folder: str, *, what: str, hint: str,
                complete: Callable[[Path], bool], check: Callable[[Path], None]) -> None:
    """Make ``data_dir/folder`` (it may be nested, e.g. ``FashionMNIST/raw``) hold the ``files`` of dataset
    ``what``, each downloaded from the first of ``mirrors`` (base URLs) that serves it, unless
    ``complete(data_dir/folder)`` finds them there once the lock is held. ``check(folder)`` verifies the
    downloaded files (raising UsageError) before the folder is put in place."""
    from torchvision.datasets.utils import download_url

    with _staged(data_dir, folder, complete, what, " or ".join(mirrors), hint) as tmp:
        if tmp is None:
            return
        target = tmp / folder
        target.mkdir(parents=True)
        for name in files:
            errors = []
            for base in mirrors:
                try:
                    download_url(base.rstrip("/") + "/" + name, str(target), filename=name)
                    break
                except Exception as exc:  # this mirror failed (network, HTTP error): the next one
                    (target / name).unlink(missing_ok=True)
                    errors.append(f"{base}: {first_line(exc)}")
            else:
                raise UsageError(f"could not download {what}'s {name} into --data-dir {data_dir} from any mirror "
                                 f"({'; '.join(errors)}); {hint}")
        check(target)
