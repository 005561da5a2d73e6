"""Counts test cases from Bazel's test.xml files (GoogleTest and the Python interop
test both write JUnit XML). Usage:
  count_tests.py CONFIG TESTLOGS_DIR   -> prints one line "CONFIG passed failed skipped"
  count_tests.py --sum FILE            -> prints "N passed, N failed, N skipped"
"""
import os
import sys
import xml.etree.ElementTree as ET


def count(config, root):
    passed = failed = skipped = 0
    for dirpath, _, files in os.walk(root, followlinks=True):
        if "test.xml" not in files:
            continue
        target = os.path.relpath(dirpath, root)
        try:
            tree = ET.parse(os.path.join(dirpath, "test.xml"))
        except ET.ParseError:
            print(f"  [{config}] {target}: unreadable test.xml (counted as failed)", file=sys.stderr)
            failed += 1
            continue
        cases = list(tree.iter("testcase"))
        if not cases:  # a target that crashed before writing cases
            print(f"  [{config}] {target}: no test cases (counted as failed)", file=sys.stderr)
            failed += 1
            continue
        for c in cases:
            name = f"{c.get('classname', '')}.{c.get('name', '')}"
            if c.find("failure") is not None or c.find("error") is not None:
                failed += 1
                print(f"  [{config}] FAILED  {target}: {name}", file=sys.stderr)
            elif c.find("skipped") is not None or c.get("result") == "skipped" \
                    or c.get("status") == "notrun":
                skipped += 1
                print(f"  [{config}] SKIPPED {target}: {name}", file=sys.stderr)
            else:
                passed += 1
    return passed, failed, skipped


def main():
    if sys.argv[1] == "--sum":
        p = f = s = 0
        with open(sys.argv[2]) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) == 4 and parts[1].isdigit():
                    p += int(parts[1]); f += int(parts[2]); s += int(parts[3])
        print(f"{p} passed, {f} failed, {s} skipped")
        return
    config, root = sys.argv[1], sys.argv[2]
    p, f, s = count(config, root)
    print(f"  [{config}] {p} passed, {f} failed, {s} skipped", file=sys.stderr)
    print(f"{config} {p} {f} {s}")


main()
