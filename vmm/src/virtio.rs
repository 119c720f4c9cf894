//! The VM's virtio devices: opened from the config before the VM exists (so a missing image, a
//! tap that cannot be made or a socket in use is reported before anything starts), then placed
//! on the MMIO bus behind virtio-mmio transports, wired to KVM (an ioeventfd per queue, an irqfd
//! per device), announced on the kernel command line, and served by the event loop.
//!
//! Device `i` (disks first, then nets, vsock, rng) sits at `VIRTIO_MMIO_START + i * 4 KiB` on
//! IOAPIC pin `FIRST_VIRTIO_IRQ + i`.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use cove_devices::bus::lock;
use cove_devices::virtio::mmio::QUEUE_NOTIFY_OFFSET;
use cove_devices::virtio::net::{MacAddress, Net, Tap};
use cove_devices::virtio::vsock::Vsock;
use cove_devices::virtio::{
    Block, BlockConfig, MmioTransport, Rng, VirtioDevice, MMIO_REGION_SIZE,
};
use cove_devices::Bus;
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::x86_64::layout::{FIRST_VIRTIO_IRQ, VIRTIO_MMIO_START};

#[derive(Debug, thiserror::Error)]
pub enum VirtioSetupError {
    #[error("disk {index} ({path})")]
    Disk {
        index: usize,
        path: std::path::PathBuf,
        #[source]
        source: cove_devices::virtio::BlockError,
    },
    #[error("network interface {index}")]
    Tap {
        index: usize,
        #[source]
        source: cove_devices::virtio::net::TapError,
    },
    #[error("network interface {index}")]
    Net {
        index: usize,
        #[source]
        source: cove_devices::virtio::net::NetError,
    },
    #[error("network interface {index}")]
    Mac {
        index: usize,
        #[source]
        source: cove_devices::virtio::net::MacAddressError,
    },
    #[error("the vsock socket {0} is in use by a running process: choose another path")]
    VsockSocketInUse(std::path::PathBuf),
    #[error("cannot remove the stale vsock socket {path}")]
    RemoveStaleSocket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the vsock device")]
    Vsock(#[source] cove_devices::virtio::vsock::VsockError),
    #[error("cannot create the virtio-mmio transport of {name}")]
    Transport {
        name: String,
        #[source]
        source: cove_devices::virtio::MmioError,
    },
    #[error("cannot place {name} on the MMIO bus")]
    Bus {
        name: String,
        #[source]
        source: cove_devices::BusError,
    },
    #[error("KVM refused to {what} for {name}")]
    Kvm {
        what: &'static str,
        name: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot duplicate a queue event of {name}")]
    QueueEvent {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the kernel command line with the virtio devices announced is {0} bytes long; Linux \
         reads at most 2047: shorten --cmdline or give fewer devices"
    )]
    CmdlineTooLong(usize),
}

/// A device model, kept typed for what the API reports about it.
enum Model {
    Block {
        device: Arc<Mutex<Block>>,
        id: String,
        path: std::path::PathBuf,
        read_only: bool,
    },
    Net(Arc<Mutex<Net>>),
    Vsock {
        device: Arc<Mutex<Vsock>>,
        cid: u64,
        socket: std::path::PathBuf,
    },
    Rng(Arc<Mutex<Rng>>),
}

impl Model {
    fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Self::Block { device, .. } => device.clone(),
            Self::Net(device) => device.clone(),
            Self::Vsock { device, .. } => device.clone(),
            Self::Rng(device) => device.clone(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Block { .. } => "block",
            Self::Net(_) => "net",
            Self::Vsock { .. } => "vsock",
            Self::Rng(_) => "rng",
        }
    }

    fn describe(&self) -> serde_json::Value {
        match self {
            Self::Block {
                device,
                id,
                path,
                read_only,
            } => {
                let device = lock(device);
                let counters = device.counters();
                serde_json::json!({
                    "id": id,
                    "path": path,
                    "readonly": read_only,
                    "capacity_sectors": device.capacity_sectors(),
                    "requests": counters.requests,
                    "failed_requests": counters.failed_requests,
                    "bounced_requests": counters.bounced_requests,
                })
            }
            Self::Net(device) => {
                let device = lock(device);
                let counters = device.counters();
                serde_json::json!({
                    "tap": device.tap_name(),
                    "mac": device.mac().to_string(),
                    "rx_frames": counters.rx_frames,
                    "rx_bytes": counters.rx_bytes,
                    "tx_frames": counters.tx_frames,
                    "tx_bytes": counters.tx_bytes,
                    "rx_dropped": counters.rx_dropped,
                    "tx_dropped": counters.tx_dropped,
                })
            }
            Self::Vsock { cid, socket, .. } => serde_json::json!({
                "cid": cid,
                "socket": socket,
            }),
            Self::Rng(device) => serde_json::json!({
                "bytes_served": lock(device).bytes_served(),
            }),
        }
    }
}

/// Removes a Unix socket file that nobody listens on any more (left by a VMM that is gone), so
/// that the vsock device can listen there again; any other file is left for the device to
/// refuse.
fn remove_stale_socket(path: &std::path::Path) -> Result<(), VirtioSetupError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Ok(());
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(VirtioSetupError::VsockSocketInUse(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(|source| VirtioSetupError::RemoveStaleSocket {
        path: path.to_path_buf(),
        source,
    })
}

/// One device and where it sits.
struct Slot {
    model: Model,
    base: u64,
    irq: u32,
    transport: Option<Arc<Mutex<MmioTransport>>>,
}

impl Slot {
    fn name(&self, index: usize) -> String {
        format!("virtio-{} device {index}", self.model.kind())
    }
}

/// The VM's virtio devices.
pub struct VirtioDevices {
    slots: Vec<Slot>,
}

impl VirtioDevices {
    /// Opens every device's host side: image files, taps, the vsock listener.
    pub fn open(config: &VmConfig) -> Result<Self, VirtioSetupError> {
        let mut models = Vec::new();
        for (index, disk) in config.disks.iter().enumerate() {
            let id = disk.id_or_default(index);
            let block = Block::new(&BlockConfig {
                path: disk.path.clone(),
                read_only: disk.readonly,
                id: id.clone(),
                direct: disk.direct,
            })
            .map_err(|source| VirtioSetupError::Disk {
                index,
                path: disk.path.clone(),
                source,
            })?;
            models.push(Model::Block {
                device: Arc::new(Mutex::new(block)),
                id,
                path: disk.path.clone(),
                read_only: disk.readonly,
            });
        }
        for (index, net) in config.nets.iter().enumerate() {
            let tap = match net.ip {
                Some(ip) => Tap::create(net.tap.as_deref(), ip, net.mask_or_default()),
                None => Tap::open(net.tap.as_deref().unwrap_or_default()),
            }
            .map_err(|source| VirtioSetupError::Tap { index, source })?;
            let mac = net
                .mac
                .map_or_else(MacAddress::random, Ok)
                .map_err(|source| VirtioSetupError::Mac { index, source })?;
            let device =
                Net::new(tap, mac).map_err(|source| VirtioSetupError::Net { index, source })?;
            models.push(Model::Net(Arc::new(Mutex::new(device))));
        }
        if let Some(vsock) = &config.vsock {
            remove_stale_socket(&vsock.socket)?;
            let device = Vsock::new(&cove_devices::virtio::vsock::VsockConfig {
                guest_cid: vsock.cid,
                socket: vsock.socket.clone(),
            })
            .map_err(VirtioSetupError::Vsock)?;
            models.push(Model::Vsock {
                device: Arc::new(Mutex::new(device)),
                cid: vsock.cid,
                socket: vsock.socket.clone(),
            });
        }
        if config.rng {
            models.push(Model::Rng(Arc::new(Mutex::new(Rng::new()))));
        }
        let slots = models
            .into_iter()
            .enumerate()
            .map(|(index, model)| Slot {
                model,
                base: VIRTIO_MMIO_START + index as u64 * MMIO_REGION_SIZE,
                irq: FIRST_VIRTIO_IRQ + index as u32,
                transport: None,
            })
            .collect();
        Ok(Self { slots })
    }

    /// `cmdline` with every device announced as Linux's virtio-mmio driver reads them.
    pub fn announce(&self, cmdline: &str) -> Result<String, VirtioSetupError> {
        let mut announced = cmdline.to_string();
        for slot in &self.slots {
            if !announced.is_empty() {
                announced.push(' ');
            }
            announced.push_str(&format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                MMIO_REGION_SIZE / 1024,
                slot.base,
                slot.irq
            ));
        }
        if announced.len() >= crate::config::MAX_CMDLINE_BYTES {
            return Err(VirtioSetupError::CmdlineTooLong(announced.len()));
        }
        Ok(announced)
    }

    /// Puts each device behind a transport on `mmio_bus` and wires its notifications and its
    /// interrupt through KVM.
    pub fn attach(
        &mut self,
        vm_fd: &VmFd,
        memory: &GuestMemoryMmap,
        mmio_bus: &mut Bus,
    ) -> Result<(), VirtioSetupError> {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let name = slot.name(index);
            let transport =
                MmioTransport::new(slot.model.device(), memory.clone()).map_err(|source| {
                    VirtioSetupError::Transport {
                        name: name.clone(),
                        source,
                    }
                })?;
            let kvm_error = |what| {
                let name = name.clone();
                move |source| VirtioSetupError::Kvm { what, name, source }
            };
            vm_fd
                .register_irqfd(transport.interrupt().event(), slot.irq)
                .map_err(kvm_error("wire the interrupt"))?;
            for (queue_index, event) in transport.queue_events().iter().enumerate() {
                vm_fd
                    .register_ioevent(
                        event,
                        &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET),
                        queue_index as u32,
                    )
                    .map_err(kvm_error("wire a queue notification"))?;
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio_bus
                .insert(slot.base, MMIO_REGION_SIZE, transport.clone())
                .map_err(|source| VirtioSetupError::Bus {
                    name: name.clone(),
                    source,
                })?;
            slot.transport = Some(transport);
        }
        Ok(())
    }

    /// Starts each disk's I/O worker threads, each of which installs the block-worker seccomp
    /// filter before it touches a request. Runs while building the VM: once the event loop's
    /// filter is on, no thread can be created.
    pub fn start_block_workers(
        &self,
        filter: Option<seccompiler::BpfProgram>,
    ) -> Result<(), VirtioSetupError> {
        let filter = Arc::new(filter);
        let hook: cove_devices::virtio::block::ThreadStartHook = Arc::new(move || {
            crate::seccomp::apply(crate::seccomp::ThreadKind::BlockWorker, &filter)
                .map_err(|error| error.into())
        });
        let mut disk = 0;
        for slot in &self.slots {
            if let Model::Block { device, path, .. } = &slot.model {
                lock(device).start_workers(hook.clone()).map_err(|source| {
                    VirtioSetupError::Disk {
                        index: disk,
                        path: path.clone(),
                        source,
                    }
                })?;
                disk += 1;
            }
        }
        Ok(())
    }

    /// One event-loop subscriber per attached device.
    pub fn subscribers(&self) -> Result<Vec<DeviceServer>, VirtioSetupError> {
        let mut servers = Vec::new();
        for (index, slot) in self.slots.iter().enumerate() {
            let Some(transport) = &slot.transport else {
                continue;
            };
            let name = slot.name(index);
            let queue_events = lock(transport)
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| VirtioSetupError::QueueEvent {
                    name: name.clone(),
                    source,
                })?;
            let device = slot.model.device();
            let backend = lock(&device).backend_fd();
            servers.push(DeviceServer {
                name,
                transport: transport.clone(),
                device,
                queue_events,
                backend,
                stopped: false,
            });
        }
        Ok(servers)
    }

    /// Removes what the devices made on the host's file system (the vsock socket); taps made by
    /// cove-vmm go with its descriptors.
    pub fn remove_host_files(&self) {
        for slot in &self.slots {
            if let Model::Vsock { socket, .. } = &slot.model {
                let _ = std::fs::remove_file(socket);
            }
        }
    }

    /// What the API reports: each device's place, its host side and its counters.
    pub fn describe(&self) -> serde_json::Value {
        let devices: Vec<serde_json::Value> = self
            .slots
            .iter()
            .map(|slot| {
                let mut entry = slot.model.describe();
                if let Some(object) = entry.as_object_mut() {
                    object.insert("type".into(), slot.model.kind().into());
                    object.insert("mmio_base".into(), format!("{:#x}", slot.base).into());
                    object.insert("irq".into(), slot.irq.into());
                    if let Some(transport) = &slot.transport {
                        let transport = lock(transport);
                        object.insert("status".into(), transport.status().into());
                        object.insert(
                            "ignored_register_accesses".into(),
                            transport.ignored_accesses().into(),
                        );
                        object.insert(
                            "queue_notify_exits".into(),
                            transport.trapped_notifications().into(),
                        );
                        if let Some(error) = transport.activation_error() {
                            object.insert("error".into(), crate::describe_error(error).into());
                        }
                    }
                }
                entry
            })
            .collect();
        serde_json::Value::Array(devices)
    }
}

impl Drop for VirtioDevices {
    /// A VM that fails to build leaves no socket behind either.
    fn drop(&mut self) {
        self.remove_host_files();
    }
}

/// Serves one device from the event loop: its queue notifications (ioeventfds) and its host
/// side. A device that fails is stopped and the driver told (NEEDS_RESET); it is served again
/// once the driver has reset it and set it up anew.
pub struct DeviceServer {
    name: String,
    transport: Arc<Mutex<MmioTransport>>,
    device: Arc<Mutex<dyn VirtioDevice>>,
    queue_events: Vec<EventFd>,
    backend: Option<RawFd>,
    stopped: bool,
}

impl DeviceServer {
    /// Whether the device may be served: not stopped, or reset by the driver since it stopped.
    fn servable(&mut self, ops: &mut EventOps) -> bool {
        if self.stopped && !lock(&self.transport).needs_reset() {
            self.stopped = false;
            if let Some(fd) = self.backend {
                let _ = ops.add(Events::new_raw(fd, EventSet::IN));
            }
        }
        !self.stopped
    }

    fn stop(&mut self, error: cove_devices::virtio::VirtioError, ops: &mut EventOps) {
        eprintln!(
            "cove-vmm: {} stopped until the guest resets it: {}",
            self.name,
            crate::describe_error(&error)
        );
        self.stopped = true;
        // A level-triggered host descriptor of a stopped device would wake the loop forever.
        if let Some(fd) = self.backend {
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
        }
        lock(&self.transport).device_failed(error);
    }
}

impl MutEventSubscriber for DeviceServer {
    fn init(&mut self, ops: &mut EventOps) {
        for event in &self.queue_events {
            let _ = ops.add(Events::new_raw(event.as_raw_fd(), EventSet::IN));
        }
        if let Some(fd) = self.backend {
            let _ = ops.add(Events::new_raw(fd, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let queue = self
            .queue_events
            .iter()
            .position(|event| event.as_raw_fd() == fd);
        if let Some(queue_index) = queue {
            let _ = self.queue_events[queue_index].read();
        }
        if !self.servable(ops) {
            return;
        }
        let result = match queue {
            Some(queue_index) => lock(&self.device).process_queue(queue_index),
            None if Some(fd) == self.backend => lock(&self.device).process_backend(),
            None => Ok(()),
        };
        if let Err(error) = result {
            self.stop(error, ops);
        }
    }
}
