//! The gRPC wire types garret speaks, generated at build time from the
//! `.proto` files in the workspace's `proto/` directory (see `build.rs`).
//!
//! Only the cache half of REAPI v2 is here (no Execution service), plus
//! `google.bytestream`, `google.rpc.Status` and `grpc.health.v1`. Both server
//! and client stubs are generated: the server implements the former, the
//! conformance tests drive it with the latter.
//!
//! Modules nest by proto package because generated code refers to other
//! packages by relative `super::` paths; the short aliases at the bottom are
//! what the rest of garret uses.

/// One generated package as a module. Generated code gets the lints of
/// generated code, not ours.
macro_rules! generated {
    ($module:ident, $package:literal) => {
        #[allow(
            clippy::pedantic,
            clippy::all,
            missing_debug_implementations,
            reason = "generated code"
        )]
        pub mod $module {
            tonic::include_proto!($package);
        }
    };
}

pub mod build {
    pub mod bazel {
        pub mod remote {
            pub mod execution {
                generated!(v2, "build.bazel.remote.execution.v2");
            }
        }
        generated!(semver, "build.bazel.semver");
    }
}

pub mod google {
    generated!(bytestream, "google.bytestream");
    generated!(rpc, "google.rpc");
}

pub mod grpc {
    pub mod health {
        generated!(v1, "grpc.health.v1");
    }
}

/// `build.bazel.remote.execution.v2`: CAS, action cache, capabilities.
pub use build::bazel::remote::execution::v2 as reapi;
/// `build.bazel.semver`: the API versions in `ServerCapabilities`.
pub use build::bazel::semver;
/// `google.bytestream`: streaming reads and resumable writes of large blobs.
pub use google::bytestream;
/// `google.rpc`: the per-entry status of batch responses.
pub use google::rpc;
/// `grpc.health.v1`: the standard health check, for load balancers.
pub use grpc::health::v1 as health;
