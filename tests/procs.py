"""Helpers of the tests that kill real processes: the live processes of a session, the
committed rows of a store being written."""

from __future__ import annotations

import json
import os


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``, from /proc."""
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(name))
    return pids


def store_rows(store) -> int:
    """Committed rows of the store at path ``store`` (-1 before it exists)."""
    try:
        with open(os.path.join(store, "zarr.json")) as fh:
            return json.load(fh)["attributes"]["rows"]
    except (OSError, ValueError, KeyError):
        return -1
