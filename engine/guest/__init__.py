"""Files inside backups: the guest's partitions, logical volumes and filesystems, parsed in user space.

No loop device, no mount(2), no kernel filesystem code: the bytes come
from a backup's view (the chain), the parsing from Dissect's modules, and
everything a guest wrote is treated as hostile input (bounded work per
request, names checked, errors confined to what they touch).

    reader      the backup as a file object, with a work budget per request
    probe       what a range holds, from its signature
    partitions  GPT and MBR, numbered as Linux numbers them
    disk        the volumes of a disk (partitions, LVM2, whole-disk filesystem)
    guestfs     one shape for every filesystem; fs_* adapt each parser to it
    volume      one opened filesystem: paths, listings, data, under its lock
    guestdisk   a backup's volumes, found once, opened on first use
"""
