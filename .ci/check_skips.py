"""Fail a CI run with ComfyUI on any skip that .ci/allowed-skips does not name.

With ComfyUI, Chromium and diffusers installed every test can run, so a skip there means something
is missing or a test skips for a reason nobody chose: a green run must not hide it.
Usage: check_skips.py JUNIT_XML ALLOWED_SKIPS_FILE
ALLOWED_SKIPS_FILE: one regular expression per line matched against "nodeid: reason"; text after
" #" is the why; a line starting "[no-chromium]" applies only when WANQUANT_CI_NO_CHROMIUM=1.
"""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET


def allowed_patterns(path: str) -> list[re.Pattern]:
    out = []
    for line in open(path, encoding="utf-8"):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[no-chromium]"):
            if os.environ.get("WANQUANT_CI_NO_CHROMIUM") != "1":
                continue
            line = line[len("[no-chromium]"):].strip()
        out.append(re.compile(line))
    return out


def skips(junit: str) -> list[str]:
    found = []
    for case in ET.parse(junit).iter("testcase"):
        for sk in case.findall("skipped"):
            nodeid = f"{case.get('classname', '')}::{case.get('name', '')}"
            found.append(f"{nodeid}: {sk.get('message', '')}")
    return found


def main(junit: str, allowed_file: str) -> int:
    patterns = allowed_patterns(allowed_file)
    all_skips = skips(junit)
    bad = [s for s in all_skips if not any(p.search(s) for p in patterns)]
    print(f"check_skips: {len(all_skips)} skipped, {len(all_skips) - len(bad)} of them allowed by {allowed_file}")
    for s in all_skips:
        print(("  NOT ALLOWED  " if s in bad else "  allowed      ") + s)
    if bad:
        print(f"check_skips: {len(bad)} skip(s) not allowed: make them run in CI, or add them to {allowed_file} "
              f"with the reason", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
