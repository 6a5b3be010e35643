"""Drop the members of a wheel under given folders, and their lines in its RECORD, in place.

What travels to the GPU machine (the checkout, the wheels, the data) must fit the device tool's 64 MiB, and MLflow's
wheel is mostly its UI's built JavaScript (mlflow/server/js: 7.7 of 12.0 MB compressed, mlflow 3.17.2), which
nothing on that machine serves: experiments/gpu_prep.sh leaves it out.

    python experiments/slim_wheel.py WHEEL FOLDER/ [FOLDER/ ...]
"""
from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path


def slim(wheel: Path, folders: tuple[str, ...]) -> int:
    """Rewrite `wheel` without the members whose path starts with one of `folders`; the number dropped."""
    tmp = wheel.with_name(wheel.name + ".tmp")
    dropped = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w") as dst:
        for info in src.infolist():
            if info.filename.startswith(folders):
                dropped += 1
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # pip installs what RECORD lists that the wheel has
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not line.decode().startswith(folders))
            dst.writestr(info, data)  # with the member's own compression
    os.replace(tmp, wheel)
    return dropped


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    wheel, folders = Path(argv[0]), tuple(argv[1:])
    if not wheel.is_file():
        raise SystemExit(f"slim_wheel: {wheel}: no such wheel")
    before = wheel.stat().st_size
    n = slim(wheel, folders)
    print(f"{wheel.name}: {n} members under {', '.join(folders)} left out, {before / 1e6:.1f} -> "
          f"{wheel.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
