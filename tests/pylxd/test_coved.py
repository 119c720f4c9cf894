"""pylxd against coved: the same flows a Python user of LXD runs, checked end to end.

    LXD_DIR=$COVE_DIR tests/pylxd/run tests/pylxd/test_coved.py busybox.tar.gz

Imports the image, creates and starts a container, runs commands (output, exit code, stdin),
pushes and pulls files, reads state, stops and deletes it. Prints "pylxd: all passed" at the
end; any failure raises.
"""

import sys

import pylxd
from pylxd.exceptions import LXDAPIException


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def main(tarball):
    client = pylxd.Client()
    check(client.trusted, "the unix socket is trusted")
    check(client.has_api_extension("instances"), "coved announces instances")

    with open(tarball, "rb") as image_file:
        image = client.images.create(image_file.read(), wait=True)
    image.add_alias("busybox", "busybox for pylxd")
    check(client.images.get_by_alias("busybox").fingerprint == image.fingerprint, "alias")
    check(len(image.fingerprint) == 64, "a sha256 fingerprint")

    instance = client.instances.create(
        {
            "name": "py1",
            "source": {"type": "image", "alias": "busybox"},
            "config": {"environment.FROM_CONFIG": "yes", "limits.processes": "200"},
        },
        wait=True,
    )
    instance.start(wait=True)
    instance.sync()
    check(instance.status == "Running", f"running, not {instance.status}")
    check(client.instances.exists("py1"), "exists")
    check([i.name for i in client.instances.all()] == ["py1"], "listed")

    result = instance.execute(["sh", "-c", "echo out; echo err >&2; exit 3"])
    check(result.exit_code == 3, f"exit code {result.exit_code}")
    check(result.stdout == "out\n", repr(result.stdout))
    check(result.stderr == "err\n", repr(result.stderr))
    result = instance.execute(["cat"], stdin_payload="through stdin")
    check(result.stdout == "through stdin", repr(result.stdout))
    result = instance.execute(["sh", "-c", "echo $FROM_CONFIG $EXTRA"], environment={"EXTRA": "x"})
    check(result.stdout == "yes x\n", repr(result.stdout))
    result = instance.execute(["id", "-u"], user=1000, group=1000, cwd="/tmp")
    check(result.stdout == "1000\n", repr(result.stdout))

    instance.files.put("/root/from-python", b"python bytes", mode="0600", uid=0, gid=0)
    check(instance.files.get("/root/from-python") == b"python bytes", "pulled back")
    result = instance.execute(["stat", "-c", "%a", "/root/from-python"])
    check(result.stdout == "600\n", repr(result.stdout))
    instance.files.delete("/root/from-python")
    try:
        instance.files.get("/root/from-python")
        raise AssertionError("a deleted file was found")
    except LXDAPIException:
        pass

    state = instance.state()
    check(state.status == "Running" and state.pid > 1, "state")

    try:
        client.instances.create(
            {"name": "py1", "source": {"type": "image", "alias": "busybox"}}, wait=True
        )
        raise AssertionError("a duplicate name was accepted")
    except LXDAPIException as error:
        check("already exists" in str(error), str(error))

    instance.stop(wait=True)
    instance.sync()
    check(instance.status == "Stopped", instance.status)
    instance.delete(wait=True)
    check(client.instances.all() == [], "deleted")
    image.delete(wait=True)
    check(client.images.all() == [], "image deleted")
    print("pylxd: all passed")


if __name__ == "__main__":
    main(sys.argv[1])
