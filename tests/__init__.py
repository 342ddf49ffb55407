"""The test suite as a package, so that its helpers are imported by name
(``from tests.oracle import qemu_img``) from the tests and from bench/ alike,
with no sys.path edits; conftest.py holds only fixtures."""
