//! virtio-vsock (virtio 1.2, section 5.10) with its host side on Unix sockets.
