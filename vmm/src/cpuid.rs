//! The CPUID a guest sees: what KVM supports, given a topology (one socket, one core per vCPU,
//! one thread per core) and the hypervisor bit, then shaped by a profile.
//!
//! On a kvm-pvm host (a software hypervisor nested in a cloud VM) guest kernel code runs under
//! instruction emulation, which lacks some instructions: `lock cmpxchg16b`, `popcnt`, `clac`/`stac`
//! and the XSAVE family among them. A guest that sees those features in CPUID uses them and dies
//! with an emulation failure, so the `kvm-pvm` profile hides them. The full list and how it was
//! found are in docs/kvm-pvm.md.

use std::path::Path;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::config::{CpuProfile, CpusConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Register {
    Ebx,
    Ecx,
    Edx,
    Eax,
}

/// Where one feature bit lives.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    pub name: &'static str,
    leaf: u32,
    subleaf: u32,
    register: Register,
    bit: u32,
}

const fn bit_of(
    name: &'static str,
    leaf: u32,
    subleaf: u32,
    register: Register,
    bit: u32,
) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        register,
        bit,
    }
}

use Register::{Eax, Ebx, Ecx, Edx};

/// The features a user can show or hide by name.
pub const FEATURES: &[Feature] = &[
    bit_of("pclmulqdq", 1, 0, Ecx, 1),
    bit_of("ssse3", 1, 0, Ecx, 9),
    bit_of("fma", 1, 0, Ecx, 12),
    bit_of("cx16", 1, 0, Ecx, 13),
    bit_of("pcid", 1, 0, Ecx, 17),
    bit_of("sse4.1", 1, 0, Ecx, 19),
    bit_of("sse4.2", 1, 0, Ecx, 20),
    bit_of("x2apic", 1, 0, Ecx, 21),
    bit_of("movbe", 1, 0, Ecx, 22),
    bit_of("popcnt", 1, 0, Ecx, 23),
    bit_of("tsc-deadline", 1, 0, Ecx, 24),
    bit_of("aes", 1, 0, Ecx, 25),
    bit_of("xsave", 1, 0, Ecx, 26),
    bit_of("avx", 1, 0, Ecx, 28),
    bit_of("f16c", 1, 0, Ecx, 29),
    bit_of("rdrand", 1, 0, Ecx, 30),
    bit_of("fsgsbase", 7, 0, Ebx, 0),
    bit_of("bmi1", 7, 0, Ebx, 3),
    bit_of("avx2", 7, 0, Ebx, 5),
    bit_of("smep", 7, 0, Ebx, 7),
    bit_of("bmi2", 7, 0, Ebx, 8),
    bit_of("erms", 7, 0, Ebx, 9),
    bit_of("invpcid", 7, 0, Ebx, 10),
    bit_of("avx512f", 7, 0, Ebx, 16),
    bit_of("rdseed", 7, 0, Ebx, 18),
    bit_of("adx", 7, 0, Ebx, 19),
    bit_of("smap", 7, 0, Ebx, 20),
    bit_of("sha", 7, 0, Ebx, 29),
    bit_of("umip", 7, 0, Ecx, 2),
    bit_of("pku", 7, 0, Ecx, 3),
    bit_of("la57", 7, 0, Ecx, 16),
    bit_of("rdpid", 7, 0, Ecx, 22),
    bit_of("fsrm", 7, 0, Edx, 4),
    bit_of("xsaveopt", 0xd, 1, Eax, 0),
    bit_of("xsavec", 0xd, 1, Eax, 1),
    bit_of("xsaves", 0xd, 1, Eax, 3),
    bit_of("topoext", 0x8000_0001, 0, Ecx, 22),
    bit_of("pdpe1gb", 0x8000_0001, 0, Edx, 26),
    bit_of("rdtscp", 0x8000_0001, 0, Edx, 27),
];

/// Looks a feature up by the name `--cpu-features` takes.
pub fn feature(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|feature| feature.name == name)
}

/// What the kvm-pvm profile hides, each for a failure seen on such a host (docs/kvm-pvm.md).
pub const KVM_PVM_HIDDEN: &[&str] = &["cx16", "popcnt", "smap", "xsave"];

/// Features that cannot work once another is hidden: AVX state lives in the XSAVE area, and the
/// AVX-encoded extensions need AVX.
const IMPLIED: &[(&str, &[&str])] = &[
    ("xsave", &["avx", "xsaveopt", "xsavec", "xsaves"]),
    ("avx", &["avx2", "fma", "f16c", "avx512f"]),
];

/// The kind of host /dev/kvm runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// VT-x or AMD-V: guests run natively.
    Hardware,
    /// kvm-pvm: a software hypervisor; guest kernel code is emulated.
    KvmPvm,
}

impl HostKind {
    /// kvm-pvm announces itself as a module; without it, a /dev/kvm on a CPU that shows neither
    /// VMX nor SVM can only be a software hypervisor.
    pub fn detect() -> Self {
        if Path::new("/sys/module/kvm_pvm").exists() || !host_has_hardware_virtualization() {
            Self::KvmPvm
        } else {
            Self::Hardware
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hardware => "hardware",
            Self::KvmPvm => "kvm-pvm",
        }
    }
}

fn host_has_hardware_virtualization() -> bool {
    let basic = std::arch::x86_64::__cpuid(1);
    let extended = std::arch::x86_64::__cpuid(0x8000_0001);
    let vmx = basic.ecx & (1 << 5) != 0;
    let svm = extended.ecx & (1 << 2) != 0;
    vmx || svm
}

/// The profile `auto` stands for on this host.
pub fn resolve_profile(profile: CpuProfile, host: HostKind) -> CpuProfile {
    match (profile, host) {
        (CpuProfile::Auto, HostKind::KvmPvm) => CpuProfile::KvmPvm,
        (CpuProfile::Auto, HostKind::Hardware) => CpuProfile::Host,
        (chosen, _) => chosen,
    }
}

/// The names of the features hidden from the guest for `config` on `host`, implied ones included.
pub fn hidden_features(config: &CpusConfig, host: HostKind) -> Vec<&'static str> {
    let mut hidden: Vec<&'static str> = match resolve_profile(config.profile, host) {
        CpuProfile::KvmPvm => KVM_PVM_HIDDEN.to_vec(),
        _ => Vec::new(),
    };
    for change in &config.features {
        let Some(feature) = feature(&change.name) else {
            continue;
        };
        hidden.retain(|name| *name != feature.name);
        if !change.enable {
            hidden.push(feature.name);
        }
    }
    let mut index = 0;
    while index < hidden.len() {
        for (cause, implied) in IMPLIED {
            if hidden[index] == *cause {
                for name in *implied {
                    if !hidden.contains(name) {
                        hidden.push(name);
                    }
                }
            }
        }
        index += 1;
    }
    hidden
}

fn register(entry: &mut kvm_cpuid_entry2, register: Register) -> &mut u32 {
    match register {
        Eax => &mut entry.eax,
        Ebx => &mut entry.ebx,
        Ecx => &mut entry.ecx,
        Edx => &mut entry.edx,
    }
}

/// Shapes KVM's supported CPUID for vCPU `index` of `count`.
pub fn shape(supported: &CpuId, index: u32, count: u32, hidden: &[&str]) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = index;
    // Bits needed to number `count` cores, as the topology leaves report it.
    let core_bits = u32::BITS - (count.max(1) - 1).leading_zeros();
    let xsave_hidden = hidden.contains(&"xsave");
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (apic_id << 24) | (count.min(255) << 16) | (entry.ebx & 0xffff);
                entry.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid.
                entry.ecx |= 1 << 31; // Running under a hypervisor.
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; one thread shares each cache level.
                entry.eax = (entry.eax & 0x3ff) | ((count.min(64) - 1) << 26);
            }
            0xb | 0x1f => match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                    entry.edx = apic_id;
                }
                1 => {
                    entry.eax = core_bits;
                    entry.ebx = count;
                    entry.ecx = (2 << 8) | 1;
                    entry.edx = apic_id;
                }
                level => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = level;
                    entry.edx = apic_id;
                }
            },
            0xd if xsave_hidden => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0x8000_0008 => {
                entry.ecx = (core_bits << 12) | (count - 1).min(255);
            }
            _ => {}
        }
    }
    for name in hidden {
        let Some(feature) = feature(name) else {
            continue;
        };
        for entry in cpuid.as_mut_slice() {
            if entry.function == feature.leaf && entry.index == feature.subleaf {
                *register(entry, feature.register) &= !(1 << feature.bit);
            }
        }
    }
    // TOPOEXT announces leaf 0x8000_001e, whose topology cove does not describe.
    for entry in cpuid.as_mut_slice() {
        if entry.function == 0x8000_0001 {
            entry.ecx &= !(1 << 22);
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FeatureChange;

    fn supported() -> CpuId {
        let entry = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            entry(1, 0, 0x00a5_0f00, 0x0000_0800, u32::MAX >> 1, 0x178b_fbff),
            entry(7, 0, 0, u32::MAX, u32::MAX, u32::MAX),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 16, 0x201, 7),
            entry(0xd, 0, 7, 0x340, 0x340, 0),
        ])
        .unwrap()
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|entry| entry.function == function && entry.index == index)
            .unwrap()
    }

    #[test]
    fn topology_and_hypervisor_bit_describe_the_vm() {
        let shaped = shape(&supported(), 2, 4, &[]);
        let leaf1 = find(&shaped, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 2, "APIC ID");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        let cores = find(&shaped, 0xb, 1);
        assert_eq!((cores.eax, cores.ebx, cores.edx), (2, 4, 2));
        assert_eq!(find(&shaped, 0xb, 0).ebx, 1, "one thread per core");
    }

    #[test]
    fn kvm_pvm_profile_hides_what_the_emulator_lacks() {
        let config = CpusConfig {
            boot: 1,
            profile: CpuProfile::Auto,
            features: vec![],
        };
        let hidden = hidden_features(&config, HostKind::KvmPvm);
        let shaped = shape(&supported(), 0, 1, &hidden);
        let leaf1 = find(&shaped, 1, 0);
        for bit in [13, 23, 26, 28, 12, 29] {
            assert_eq!(leaf1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_eq!(find(&shaped, 7, 0).ebx & (1 << 20), 0, "smap");
        assert_eq!(
            find(&shaped, 7, 0).ebx & (1 << 5),
            0,
            "avx2 goes with xsave"
        );
        assert_eq!(find(&shaped, 0xd, 0).eax, 0, "no xsave state");
        assert!(hidden_features(&config, HostKind::Hardware).is_empty());
    }

    #[test]
    fn user_changes_apply_after_the_profile() {
        let config = CpusConfig {
            boot: 1,
            profile: CpuProfile::KvmPvm,
            features: vec![
                FeatureChange {
                    name: "popcnt".into(),
                    enable: true,
                },
                FeatureChange {
                    name: "rdrand".into(),
                    enable: false,
                },
            ],
        };
        let hidden = hidden_features(&config, HostKind::Hardware);
        assert!(!hidden.contains(&"popcnt"));
        assert!(hidden.contains(&"rdrand"));
        assert!(hidden.contains(&"cx16"));
        let shaped = shape(&supported(), 0, 1, &hidden);
        assert_ne!(find(&shaped, 1, 0).ecx & (1 << 23), 0, "popcnt shown again");
        assert_eq!(find(&shaped, 1, 0).ecx & (1 << 30), 0, "rdrand hidden");
    }
}
