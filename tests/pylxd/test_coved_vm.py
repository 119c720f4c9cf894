"""pylxd against coved's virtual machines, as a Python user of LXD drives them.

    LXD_DIR=$COVE_DIR tests/pylxd/run tests/pylxd/test_coved_vm.py busybox.tar.gz KVM_PVM

KVM_PVM is "1" on a kvm-pvm host: there a VM without boot.allow_emulated_kvm must be refused
with the key named, and the VM is then made with the key. The VM is created, started, runs a
command (output, exit code), takes and gives back a file, shows its state, and is stopped and
deleted. Prints "pylxd vm: all passed" at the end; any failure raises.
"""

import sys

import pylxd
from pylxd.exceptions import LXDAPIException

KEY = "boot.allow_emulated_kvm"


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def main(tarball, kvm_pvm):
    client = pylxd.Client()
    with open(tarball, "rb") as image_file:
        image = client.images.create(image_file.read(), wait=True)
    image.add_alias("busybox", "busybox for pylxd")
    definition = {
        "name": "pyvm",
        "type": "virtual-machine",
        "source": {"type": "image", "alias": "busybox"},
        "config": {"limits.memory": "256MiB"},
    }
    if kvm_pvm:
        try:
            client.instances.create(definition, wait=True)
            raise AssertionError("a VM without the opt-in key was created on kvm-pvm")
        except LXDAPIException as error:
            check(KEY in str(error), f"the refusal names {KEY}: {error}")
        check(not client.instances.exists("pyvm"), "nothing was created")
        definition["config"][KEY] = "true"

    instance = client.instances.create(definition, wait=True)
    check(instance.type == "virtual-machine", f"type {instance.type}")
    instance.start(wait=True)
    instance.sync()
    check(instance.status == "Running", f"running, not {instance.status}")

    result = instance.execute(["sh", "-c", "echo out; exit 3"])
    check(result.exit_code == 3, f"exit code {result.exit_code}")
    check(result.stdout == "out\n", repr(result.stdout))

    instance.files.put("/root/from-python", b"python bytes", mode="0600", uid=0, gid=0)
    check(instance.files.get("/root/from-python") == b"python bytes", "pulled back")

    state = instance.state()
    check(state.status == "Running", f"state {state.status}")
    check(state.memory["usage"] > 0, f"memory {state.memory}")

    instance.stop(wait=True)
    instance.sync()
    check(instance.status == "Stopped", f"stopped, not {instance.status}")
    instance.delete(wait=True)
    check(not client.instances.exists("pyvm"), "deleted")
    image.delete(wait=True)
    print("pylxd vm: all passed")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
