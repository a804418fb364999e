//! Architecture-specific parts: memory layout, boot set-up, firmware tables, vCPU registers.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use self::aarch64 as current;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64 as current;
