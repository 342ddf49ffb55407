"""Naming RBD sources, without a cluster: what is accepted, what is refused, and
how a name travels (the catalog, the control line, the mount's checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupfs.control import DeviceAdd, parse_control
from backupfs.mountinfo import check_sources_outside
from engine.catalog import Catalog, CatalogError
from engine.ceph import CephError, from_record, is_rbd, parse
from engine.sourceid import RBD, SourceId


def test_rbd_names_parse_to_pool_namespace_and_image(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CEPH_CONF", str(tmp_path / "c.conf"))
    spec = parse("rbd:pool/img")
    assert (spec.pool, spec.namespace, spec.image, spec.conf) == ("pool", "", "img", str(tmp_path / "c.conf"))
    assert spec.source == "rbd:pool/img"
    spec = parse("rbd:pool/ns/img", "relative.conf", "backup")
    assert (spec.namespace, spec.client) == ("ns", "backup")
    assert spec.conf == str(Path("relative.conf").absolute()), "kept absolute: the daemon's cwd differs"
    assert from_record(spec.source, spec.options()) == spec
    monkeypatch.delenv("CEPH_CONF")
    assert parse("rbd:p/i").conf == "/etc/ceph/ceph.conf"


@pytest.mark.parametrize("bad", ["rbd:", "rbd:pool", "rbd:/img", "rbd:pool/", "rbd:a/b/c/d", "rbd:pool/img@snap",
                                 "rbd:pool/../img", "rbd:pool/im\ng", "rbd:pool/" + "x" * 200, "rbd:.hidden/img"])
def test_bad_rbd_names_are_refused_in_one_line(bad: str) -> None:
    with pytest.raises(CephError) as e:
        parse(bad)
    assert "\n" not in str(e.value)


def test_a_bad_client_id_is_refused() -> None:
    with pytest.raises(CephError, match="--ceph-id"):
        parse("rbd:p/i", client="admin;rm")


def test_rbd_identity_round_trips_through_the_catalog_form() -> None:
    ident = SourceId(RBD, dev=3, image="10ab2c")
    assert SourceId.decode(ident.encode()) == ident
    with pytest.raises(ValueError):
        SourceId.decode("rbd 3 ../x")


def test_the_control_line_carries_the_cluster_settings() -> None:
    cmd = DeviceAdd("vm", "rbd:pool/ns/img", ceph_conf="/etc/ceph/x.conf", ceph_id="backup")
    assert parse_control((cmd.line() + "\n").encode()) == cmd
    with pytest.raises(Exception, match="absolute"):
        parse_control(b"device-add vm rbd:pool/img ceph_conf=relative.conf\n")


def test_an_rbd_source_is_never_taken_for_a_path_under_the_mount_point(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Resolved as a path, rbd:pool/img lies under the working directory: a mount there was refused."""
    monkeypatch.chdir(tmp_path)
    check_sources_outside(str(tmp_path), {"vm": "rbd:pool/img"})
    assert is_rbd("rbd:pool/img") and not is_rbd("/dev/rbd0")


def test_a_catalog_row_with_a_hand_made_rbd_source_is_refused(tmp_path: Path) -> None:
    cat = Catalog.create(str(tmp_path / "catalog.db"))
    try:
        cat.add_device("vm", "rbd:pool/img", 1 << 20, 65536, ceph='{"conf": "/etc/ceph/ceph.conf"}')
        assert cat.device("vm") is not None
        with cat.transaction() as c:
            c.execute("UPDATE devices SET source = 'rbd:pool/../etc' WHERE name = 'vm'")
        with pytest.raises(CatalogError, match="changed outside backupfs"):
            cat.device("vm")
    finally:
        cat.close()
