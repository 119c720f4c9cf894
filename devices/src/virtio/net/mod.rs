//! virtio-net (virtio 1.2, section 5.1) over a tap device.
