"""layering: checks that kvdex's folders only reach down. Bottom to top the order is
kvstore -> proto -> index -> engine -> client -> bench -> workers; kvstore/base.h and
kvstore/kvdex_base.h (//kvstore:base, :public_base) are the floor every folder may use;
gpu may use only that floor and only workers may use gpu. tests/, third_party/, deploy/
and docs/ sit outside the order and are not checked (tests may use anything).

Two kinds of edge are read: every `#include "pkg/..."` of the C, C++ and CUDA files of
a folder, and every "//pkg..." label of its BUILD files (visibility lists excepted: they
say who may use a target, not what it uses). A violation names the file, the line and
the edge. Usage: layering.py [ROOT]  (prints the violations; exit 1 when there are any)
"""
import ast
import os
import re
import sys

ORDER = ("kvstore", "proto", "index", "engine", "client", "bench", "workers")
# Folders beside the order: what each may use, and who may use it.
SIDE = {"gpu": {"uses": (), "used_by": ("workers",)}}
OUTSIDE = ("tests", "third_party", "deploy", "docs")
FLOOR_INCLUDES = {"kvstore/base.h", "kvstore/kvdex_base.h"}
FLOOR_LABELS = {"//kvstore:base", "//kvstore:public_base", "//kvstore:base.h",
                "//kvstore:kvdex_base.h"}
# Include paths that do not start with their folder's name: the installed names of
# the public headers and the generated protobuf-c headers (include prefixes in BUILD).
INCLUDE_ALIASES = (("kvdex/kvdex_base.h", "kvstore/kvdex_base.h"),
                   ("kvdex/kvdex.h", "client/kvdex.h"),
                   ("kvdex/v1/", "proto/kvdex/v1/"),
                   ("grpc/health/v1/", "proto/grpc/health/v1/"))
SOURCE_EXTS = (".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cuh")
BUILD_NAMES = ("BUILD", "BUILD.bazel")
NOT_DEPS = ("visibility", "default_visibility")  # attributes whose labels are not edges

_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"')
_LOCATION = re.compile(r"\$\((?:location|locations|execpath|execpaths|rootpath|rootpaths)"
                       r"\s+(//[^)\s]+)\)")


def allowed(src, dst):
    """Whether folder `src` may depend on folder `dst` (the floor aside)."""
    if src == dst or src in OUTSIDE or dst == "":
        return True
    if src in SIDE:
        return dst in SIDE[src]["uses"]
    if dst in SIDE:
        return src in SIDE[dst]["used_by"]
    if dst in OUTSIDE or dst not in ORDER:
        return False
    return ORDER.index(dst) < ORDER.index(src)


def packages(root):
    """The top-level folders of the tree that hold a BUILD file anywhere below them."""
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith((".", "bazel-")) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if any(f in BUILD_NAMES for _, _, files in os.walk(path) for f in files):
            out.append(name)
    return out


def include_edges(path):
    """(line, included path) of every quoted #include of a source file."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            m = _INCLUDE.match(line)
            if m:
                inc = m.group(1)
                for alias, real in INCLUDE_ALIASES:
                    if inc == alias or (alias.endswith("/") and inc.startswith(alias)):
                        inc = real + inc[len(alias):]
                        break
                yield n, inc


def _strings(node, skip):
    """(line, text) of the string constants below `node`, leaving out keyword
    arguments named in `skip`."""
    if isinstance(node, ast.keyword) and node.arg in skip:
        return
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.lineno, node.value
    for child in ast.iter_child_nodes(node):
        yield from _strings(child, skip)


def label_edges(path):
    """(line, label) of every label "//..." a BUILD file uses: whole strings and
    $(location //...) inside commands; visibility lists are not uses."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), filename=path)  # Starlark BUILD files parse as Python
    for n, text in _strings(tree, NOT_DEPS):
        if text.startswith("//"):
            yield n, text
        else:
            for m in _LOCATION.finditer(text):
                yield n, m.group(1)


def label_package(label):
    """The top-level folder of "//pkg/sub:name" ("" for the root package)."""
    return label[2:].split(":", 1)[0].split("/", 1)[0]


def check(root):
    """Every violation under `root`, as "file:line: src -> dst (what): why"."""
    found = []
    pkgs = packages(root)
    for pkg in pkgs:
        if pkg in OUTSIDE:
            continue
        if pkg not in ORDER and pkg not in SIDE:
            found.append("%s/: folder %s is not in the layer order %s (tests/layering/"
                         "layering.py)" % (pkg, pkg, " -> ".join(ORDER)))
            continue
        for dirpath, dirnames, files in os.walk(os.path.join(root, pkg)):
            dirnames.sort()
            for f in sorted(files):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, root)
                if f.endswith(SOURCE_EXTS):
                    for n, inc in include_edges(path):
                        dst = inc.split("/", 1)[0]
                        if "/" not in inc or dst not in pkgs or inc in FLOOR_INCLUDES:
                            continue  # same folder, a system or generated header, the floor
                        if not allowed(pkg, dst):
                            found.append("%s:%d: %s -> %s (#include \"%s\"): %s" % (
                                rel, n, pkg, dst, inc, why(pkg, dst)))
                elif f in BUILD_NAMES:
                    for n, label in label_edges(path):
                        dst = label_package(label)
                        if label in FLOOR_LABELS or (dst and dst not in pkgs):
                            continue
                        if not allowed(pkg, dst):
                            found.append("%s:%d: %s -> %s (%s): %s" % (
                                rel, n, pkg, dst, label, why(pkg, dst)))
    return found


def why(src, dst):
    if src in SIDE:
        return "%s may use only the floor (kvstore/base.h, kvstore/kvdex_base.h)" % src
    if dst in SIDE:
        return "only %s may use %s" % (", ".join(SIDE[dst]["used_by"]), dst)
    if dst in OUTSIDE:
        return "%s is outside the order; product folders do not use it" % dst
    if dst not in ORDER:
        return "%s is not in the layer order" % dst
    return "%s is above %s in the order %s" % (dst, src, " -> ".join(ORDER))


def main(argv):
    root = argv[1] if len(argv) > 1 else os.getcwd()
    found = check(root)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
