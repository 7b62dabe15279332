//! A pod value read from etcd: JSON, or Kubernetes' protobuf storage
//! encoding behind the `k8s\0` magic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = podcache::discovery::pod::decode_pod(data);
});
