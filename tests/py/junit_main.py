"""The end of every Python test of this repository: runs the unittest cases of the
__main__ module verbosely and writes one <testcase> per case (passed, failed or
skipped) to $XML_OUTPUT_FILE, Bazel's test.xml, which .ci/count_tests.py counts.

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    os.pardir, "py"))
    import junit_main
    ...
    if __name__ == "__main__":
        sys.exit(0 if junit_main.run("cli").wasSuccessful() else 1)
"""
import os
import sys
import unittest
from xml.sax.saxutils import escape, quoteattr


class _RecordingResult(unittest.TextTestResult):
    """Remembers the passing tests too, so that every case can be reported."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.passed = []

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed.append(test)


def write_junit(result, suite):
    path = os.environ.get("XML_OUTPUT_FILE")
    if not path:
        return
    rows = [(t, "") for t in result.passed]
    rows += [(t, "<failure message='failed'>%s</failure>" % escape(tb))
             for t, tb in result.failures + result.errors]
    rows += [(t, "<skipped message=%s/>" % quoteattr(why)) for t, why in result.skipped]
    with open(path, "w") as fh:
        fh.write('<?xml version="1.0" encoding="UTF-8"?>\n<testsuites>\n'
                 '<testsuite name=%s tests="%d">\n' % (quoteattr(suite), len(rows)))
        for t, body in rows:
            fh.write("<testcase classname=%s name=%s>%s</testcase>\n" % (
                quoteattr(type(t).__name__), quoteattr(getattr(t, "_testMethodName", str(t))),
                body))
        fh.write("</testsuite>\n</testsuites>\n")


def run(suite):
    """Runs __main__'s test cases, writes the XML as test suite `suite`, returns the
    unittest result."""
    prog = unittest.main(module="__main__", argv=[sys.argv[0], "-v"], exit=False,
                         testRunner=unittest.TextTestRunner(resultclass=_RecordingResult,
                                                            verbosity=2))
    write_junit(prog.result, suite)
    return prog.result
