"""CLI help: every option explains itself, choices come from the registries, no spec references."""

from __future__ import annotations

import re
import subprocess
import sys

import click

from geopipe.flows.cli import cli


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def test_every_option_has_help_and_no_spec_reference():
    missing, refs = [], []
    for path, cmd in _commands(cli):
        for p in cmd.params:
            if isinstance(p, click.Option):
                if not (p.help or "").strip():
                    missing.append(f"{' '.join(path)} {p.opts[0]}")
                if re.search(r"§|\b[AU]\d{1,2}\b|U§", p.help or ""):
                    refs.append(f"{' '.join(path)} {p.opts[0]}: {p.help}")
        if re.search(r"§|\(A\d{1,2}\)|\bspec A\d", cmd.help or ""):
            refs.append(f"{' '.join(path)}: {cmd.help}")
    assert not missing, missing
    assert not refs, refs


def test_light_name_lists_equal_the_registries():
    from geopipe.pipeline.methods.names import METHOD_NAMES
    from geopipe.pipeline.methods.registry import METHODS
    from geopipe.pipeline.model.names import SAMPLER_NAMES, SCHEDULE_NAMES
    from geopipe.pipeline.model.samplers import SAMPLERS
    from geopipe.pipeline.model.schedules import SCHEDULES

    assert METHOD_NAMES == tuple(METHODS) and SCHEDULE_NAMES == tuple(SCHEDULES) and SAMPLER_NAMES == tuple(SAMPLERS)


def test_method_schedule_and_sampler_are_choices_without_importing_torch():
    code = ("import sys, geopipe.flows.cli as c; "
            "t = c.cli.commands['train']; p = c.cli.commands['predict']; "
            "print([o.type.choices for o in t.params if o.name in ('method', 'schedule')], "
            "[o.type.choices for o in p.params if o.name == 'sampler'], any(m.startswith('torch') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'rfm'" in out and "'cosine_simple'" in out and "'riemann_heun'" in out and out.strip().endswith("False")
