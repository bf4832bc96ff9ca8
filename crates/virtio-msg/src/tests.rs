//! Byte-exact tests written from the field tables in the design notes.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use super::*;

fn enc(m: &Message<'_>) -> ([u8; 300], usize) {
    let mut buf = [0u8; 300];
    let n = m.encode(&mut buf).unwrap();
    (buf, n)
}

fn roundtrip(m: Message<'_>, expected: &[u8]) {
    let (buf, n) = enc(&m);
    assert_eq!(&buf[..n], expected, "encoding of {m:?}");
    assert_eq!(decode(&buf[..n]).unwrap(), m);
}

#[test]
fn header_layout() {
    // type=1 (response), id=0x07, dev 0x0102, token 0xA0B0, size 12, status 0x0F
    roundtrip(
        Message {
            dev_num: 0x0102,
            token: 0xA0B0,
            body: Body::DeviceStatus { status: 0x0F },
        },
        &[0x01, 0x07, 0x02, 0x01, 0xB0, 0xA0, 12, 0, 0x0F, 0, 0, 0],
    );
}

#[test]
fn get_device_info_request_and_response() {
    roundtrip(
        Message {
            dev_num: 3,
            token: 1,
            body: Body::GetDeviceInfo,
        },
        &[0x00, 0x02, 3, 0, 1, 0, 8, 0],
    );
    let info = DeviceInfo {
        device_id: 2,
        vendor_id: 0x1AF4,
        num_feature_bits: 64,
        config_size: 60,
        max_virtqueues: 4,
        admin_vq_start: 0x0102,
        admin_vq_count: 0x0304,
    };
    roundtrip(
        Message {
            dev_num: 3,
            token: 1,
            body: Body::DeviceInfo(info),
        },
        &[
            0x01, 0x02, 3, 0, 1, 0, 32, 0, //
            2, 0, 0, 0, 0xF4, 0x1A, 0, 0, 64, 0, 0, 0, 60, 0, 0, 0, 4, 0, 0, 0, //
            0x02, 0x01, 0x04, 0x03,
        ],
    );
}

#[test]
fn features_messages() {
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::GetDeviceFeatures {
                block_index: 0,
                num_blocks: 2,
            },
        },
        &[0x00, 0x03, 1, 0, 0, 0, 16, 0, 0, 0, 0, 0, 2, 0, 0, 0],
    );
    let mut blocks = [0u8; 8];
    let words = Words::from_bytes(feature_blocks(0x0000_0001_2000_0040, 0, &mut blocks)).unwrap();
    assert_eq!(
        words.iter().collect::<heapless_vec::V>(),
        heapless_vec::V::of(&[0x2000_0040, 1])
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::DeviceFeatures {
                block_index: 0,
                features: words,
            },
        },
        &[
            0x01, 0x03, 1, 0, 0, 0, 24, 0, 0, 0, 0, 0, 2, 0, 0, 0, //
            0x40, 0, 0, 0x20, 1, 0, 0, 0,
        ],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::SetDriverFeatures {
                block_index: 1,
                features: Words::from_bytes(&[1, 0, 0, 0]).unwrap(),
            },
        },
        &[
            0x00, 0x04, 1, 0, 0, 0, 20, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0,
        ],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::SetDriverFeaturesDone,
        },
        &[0x01, 0x04, 1, 0, 0, 0, 8, 0],
    );
}

#[test]
fn config_messages() {
    roundtrip(
        Message {
            dev_num: 1,
            token: 9,
            body: Body::GetConfig {
                offset: 8,
                length: 4,
            },
        },
        &[0x00, 0x05, 1, 0, 9, 0, 16, 0, 8, 0, 0, 0, 4, 0, 0, 0],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 9,
            body: Body::Config {
                generation: 7,
                offset: 8,
                data: &[0xAA, 0xBB],
            },
        },
        &[
            0x01, 0x05, 1, 0, 9, 0, 22, 0, 7, 0, 0, 0, 8, 0, 0, 0, 2, 0, 0, 0, 0xAA, 0xBB,
        ],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 9,
            body: Body::SetConfig {
                generation: 7,
                offset: 20,
                data: &[1],
            },
        },
        &[
            0x00, 0x06, 1, 0, 9, 0, 21, 0, 7, 0, 0, 0, 20, 0, 0, 0, 1, 0, 0, 0, 1,
        ],
    );
    // Rejected SET_CONFIG: length 0, no data.
    roundtrip(
        Message {
            dev_num: 1,
            token: 9,
            body: Body::SetConfigResult {
                generation: 8,
                offset: 20,
                length: 0,
                data: &[],
            },
        },
        &[
            0x01, 0x06, 1, 0, 9, 0, 20, 0, 8, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::EventConfig {
                device_status: 0x40,
                generation: 2,
                offset: 0,
                data: &[],
            },
        },
        &[
            0x00, 0x40, 1, 0, 0, 0, 24, 0, 0x40, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
}

#[test]
fn status_messages() {
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::GetDeviceStatus,
        },
        &[0x00, 0x07, 1, 0, 0, 0, 8, 0],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::SetDeviceStatus { status: 0 },
        },
        &[0x00, 0x08, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::SetDeviceStatusResult { status: 0x0B },
        },
        &[0x01, 0x08, 1, 0, 0, 0, 12, 0, 0x0B, 0, 0, 0],
    );
}

#[test]
fn vqueue_messages_are_48_bytes() {
    let q = Vqueue {
        index: 1,
        max_size: 0,
        size: 256,
        desc_addr: 0x0001_0000_0000_1000,
        driver_addr: 0x0001_0000_0000_2000,
        device_addr: 0x0001_0000_0000_3000,
    };
    let mut expected = vec![
        0x00, 0x0A, 1, 0, 0, 0, 48, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0,
    ];
    for a in [0x1000u64, 0x2000, 0x3000] {
        expected.extend_from_slice(&(a | 1 << 48).to_le_bytes());
    }
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::SetVqueue(q),
        },
        &expected,
    );
    let info = Vqueue {
        max_size: 1024,
        ..q
    };
    let (buf, n) = enc(&Message {
        dev_num: 1,
        token: 0,
        body: Body::VqueueInfo(info),
    });
    assert_eq!(n, 48);
    assert_eq!(&buf[..2], &[0x01, 0x09]);
    assert_eq!(
        &buf[8..24],
        &[1, 0, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    );
    // A SET_VQUEUE needs a 48-byte bus; 44 is not enough.
    let mut small = [0u8; 44];
    assert_eq!(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::SetVqueue(q)
        }
        .encode(&mut small),
        Err(EncodeError::TooLarge {
            needed: 48,
            available: 44
        })
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::GetVqueue { index: 5 },
        },
        &[0x00, 0x09, 1, 0, 0, 0, 12, 0, 5, 0, 0, 0],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::ResetVqueue { index: 5 },
        },
        &[0x00, 0x0B, 1, 0, 0, 0, 12, 0, 5, 0, 0, 0],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::SetVqueueDone,
        },
        &[0x01, 0x0A, 1, 0, 0, 0, 8, 0],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::ResetVqueueDone,
        },
        &[0x01, 0x0B, 1, 0, 0, 0, 8, 0],
    );
}

#[test]
fn shm_and_notification_events() {
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::GetShm { index: 0 },
        },
        &[0x00, 0x0C, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0],
    );
    roundtrip(
        Message {
            dev_num: 1,
            token: 0,
            body: Body::Shm {
                index: 0,
                length: 0,
                address: 0,
            },
        },
        &[
            0x01, 0x0C, 1, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    roundtrip(
        Message {
            dev_num: 2,
            token: 0,
            body: Body::EventAvail {
                vq_index: 1,
                next_offset: consts::NEXT_OFFSET_WRAP | 5,
            },
        },
        &[0x00, 0x41, 2, 0, 0, 0, 16, 0, 1, 0, 0, 0, 5, 0, 0, 0x80],
    );
    roundtrip(
        Message {
            dev_num: 2,
            token: 0,
            body: Body::EventUsed { vq_index: 3 },
        },
        &[0x00, 0x42, 2, 0, 0, 0, 12, 0, 3, 0, 0, 0],
    );
}

#[test]
fn bus_messages() {
    roundtrip(
        Message {
            dev_num: 0,
            token: 4,
            body: Body::GetDevices {
                offset: 0,
                count: 16,
            },
        },
        &[0x02, 0x02, 0, 0, 4, 0, 12, 0, 0, 0, 16, 0],
    );
    roundtrip(
        Message {
            dev_num: 0,
            token: 4,
            body: Body::Devices {
                offset: 0,
                count: 16,
                next_offset: 0,
                bitmap: &[0b0000_0010, 0],
            },
        },
        &[0x03, 0x02, 0, 0, 4, 0, 16, 0, 0, 0, 16, 0, 0, 0, 0b10, 0],
    );
    roundtrip(
        Message {
            dev_num: 0,
            token: 0,
            body: Body::Ping { data: 0xDEADBEEF },
        },
        &[0x02, 0x03, 0, 0, 0, 0, 12, 0, 0xEF, 0xBE, 0xAD, 0xDE],
    );
    roundtrip(
        Message {
            dev_num: 0,
            token: 0,
            body: Body::Pong { data: 1 },
        },
        &[0x03, 0x03, 0, 0, 0, 0, 12, 0, 1, 0, 0, 0],
    );
    roundtrip(
        Message {
            dev_num: 0,
            token: 0,
            body: Body::EventDevice {
                device_number: 7,
                state: DeviceState::Removed,
            },
        },
        &[0x02, 0x40, 0, 0, 0, 0, 12, 0, 7, 0, 2, 0],
    );
    roundtrip(
        Message {
            dev_num: 0,
            token: 0,
            body: Body::BusSpecific {
                msg_id: 0x81,
                response: false,
                payload: &[1, 2, 3],
            },
        },
        &[0x02, 0x81, 0, 0, 0, 0, 11, 0, 1, 2, 3],
    );
}

#[test]
fn rejects_short_and_mismatched_sizes() {
    assert_eq!(
        decode(&[0, 2, 0]),
        Err(DecodeError::ShorterThanHeader { len: 3 })
    );
    // msg_size says 12, only 8 bytes arrived.
    assert_eq!(
        decode(&[0, 7, 1, 0, 0, 0, 12, 0]),
        Err(DecodeError::SizeMismatch {
            msg_size: 12,
            received: 8
        })
    );
    // msg_size smaller than a header.
    assert!(matches!(
        decode(&[0, 7, 1, 0, 0, 0, 4, 0]),
        Err(DecodeError::SizeMismatch { msg_size: 4, .. })
    ));
    // Bus padding past msg_size is ignored.
    assert_eq!(
        decode(&[0, 7, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0]).unwrap().body,
        Body::GetDeviceStatus
    );
}

#[test]
fn ignores_reserved_type_bits() {
    for type_byte in [0x04u8, 0x80, 0xFC] {
        assert_eq!(
            decode(&[type_byte, 0x07, 1, 0, 0, 0, 8, 0]).unwrap().body,
            Body::GetDeviceStatus,
            "{type_byte:#x}"
        );
    }
    // The defined bits still count: 0x85 is a response.
    assert_eq!(
        decode(&[0x85, 0x07, 1, 0, 0, 0, 12, 0, 0xF, 0, 0, 0])
            .unwrap()
            .body,
        Body::DeviceStatus { status: 0xF }
    );
}

#[test]
fn ignores_padding_after_a_payload() {
    // GET_DEVICE_STATUS with msg_size covering a 64-byte slot.
    let mut m = [0u8; 64];
    m[1] = 0x07;
    m[2] = 1;
    m[6] = 64;
    assert_eq!(decode(&m).unwrap().body, Body::GetDeviceStatus);
    // SET_VQUEUE padded to 64 bytes: the fields are the first 40.
    let mut v = [0u8; 64];
    v[1] = 0x0A;
    v[2] = 1;
    v[6] = 64;
    v[8] = 2; // index
    v[16] = 0x40; // size
    v[24] = 0x11; // descriptor address
    v[32] = 0x22;
    v[40] = 0x33;
    v[48] = 0xEE; // padding
    match decode(&v).unwrap().body {
        Body::SetVqueue(q) => {
            assert_eq!((q.index, q.size), (2, 0x40));
            assert_eq!(
                (q.desc_addr, q.driver_addr, q.device_addr),
                (0x11, 0x22, 0x33)
            );
        }
        other => panic!("{other:?}"),
    }
    // GET_CONFIG response: data of `length` bytes, then padding.
    let mut c = vec![1u8, 0x05, 1, 0, 0, 0, 64, 0];
    c.extend_from_slice(&[7, 0, 0, 0, 4, 0, 0, 0, 2, 0, 0, 0, 0xAA, 0xBB]);
    c.resize(64, 0xCC);
    match decode(&c).unwrap().body {
        Body::Config { data, .. } => assert_eq!(data, &[0xAA, 0xBB]),
        other => panic!("{other:?}"),
    }
    // GET_DEVICES response padded: the bitmap is count / 8 bytes.
    let mut d = vec![
        0x03u8, 0x02, 0, 0, 0, 0, 64, 0, 0, 0, 32, 0, 0, 0, 0b101, 0, 0, 0,
    ];
    d.resize(64, 0);
    match decode(&d).unwrap().body {
        Body::Devices { count, bitmap, .. } => {
            assert_eq!(count, 32);
            assert_eq!(bitmap, &[0b101, 0, 0, 0]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn event_device_accepts_implementation_states() {
    let ev = |state: u16| -> Result<DeviceState, DecodeError> {
        let s = state.to_le_bytes();
        let m = [0x02, 0x40, 0, 0, 0, 0, 12, 0, 3, 0, s[0], s[1]];
        match decode(&m)?.body {
            Body::EventDevice {
                device_number: 3,
                state,
            } => Ok(state),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(ev(0x8000), Ok(DeviceState::Implementation(0x8000)));
    assert_eq!(ev(0xFFFF), Ok(DeviceState::Implementation(0xFFFF)));
    assert_eq!(ev(1), Ok(DeviceState::Ready));
    // The spec's own reserved states stay refused.
    for reserved in [0u16, 3, 0x7FFF] {
        assert!(matches!(
            ev(reserved),
            Err(DecodeError::InvalidField { field: "state", .. })
        ));
    }
}

#[test]
fn rejects_unknown_and_reserved_ids() {
    for id in [0x00u8, 0x01, 0x0D, 0x3F, 0x43, 0x80, 0xC0] {
        assert_eq!(
            decode(&[0, id, 1, 0, 0, 0, 8, 0]),
            Err(DecodeError::UnknownId {
                class: "transport",
                msg_id: id
            }),
            "id {id:#x}"
        );
    }
    assert_eq!(
        decode(&[0x02, 0x05, 0, 0, 0, 0, 8, 0]),
        Err(DecodeError::UnknownId {
            class: "bus",
            msg_id: 0x05
        })
    );
    assert_eq!(
        decode(&[0x01, 0x42, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0]),
        Err(DecodeError::ResponseToEvent { msg_id: 0x42 })
    );
}

#[test]
fn rejects_wrong_payload_lengths() {
    // GET_DEVICE_STATUS response one byte short of its status.
    assert_eq!(
        decode(&[1, 0x07, 1, 0, 0, 0, 11, 0, 0, 0, 0]),
        Err(DecodeError::PayloadLength {
            msg_id: 0x07,
            expected: 4,
            got: 3
        })
    );
    // SET_VQUEUE truncated to 44 bytes.
    let mut m = [0u8; 44];
    m[1] = 0x0A;
    m[2] = 1;
    m[6] = 44;
    assert_eq!(
        decode(&m),
        Err(DecodeError::PayloadLength {
            msg_id: 0x0A,
            expected: 40,
            got: 36
        })
    );
    // GET_CONFIG response whose length field claims more data than present.
    assert_eq!(
        decode(&[1, 0x05, 1, 0, 0, 0, 21, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 9]),
        Err(DecodeError::PayloadLength {
            msg_id: 0x05,
            expected: 16,
            got: 13
        })
    );
    // SET_DRIVER_FEATURES with num_blocks = 0xFFFFFFFF: no overflow, rejected.
    assert!(matches!(
        decode(&[0, 0x04, 1, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]),
        Err(DecodeError::PayloadLength { msg_id: 0x04, .. })
    ));
    // Bus message to a device number.
    assert_eq!(
        decode(&[0x02, 0x03, 5, 0, 0, 0, 12, 0, 0, 0, 0, 0]),
        Err(DecodeError::BusDeviceNumber {
            msg_id: 0x03,
            dev_num: 5
        })
    );
    // GET_DEVICES with a count that is not a multiple of 8.
    assert_eq!(
        decode(&[0x02, 0x02, 0, 0, 0, 0, 12, 0, 0, 0, 3, 0]),
        Err(DecodeError::InvalidField {
            msg_id: 0x02,
            field: "count",
            value: 3
        })
    );
    // GET_DEVICE_INFO response with num_feature_bits not a multiple of 32.
    let mut info = [0u8; 32];
    info[0] = 1;
    info[1] = 0x02;
    info[6] = 32;
    info[16] = 33;
    assert_eq!(
        decode(&info),
        Err(DecodeError::InvalidField {
            msg_id: 0x02,
            field: "num_feature_bits",
            value: 33
        })
    );
}

#[test]
fn never_panics_on_any_short_input() {
    // Exhaustive over the header space that matters plus short payloads.
    let mut buf = [0u8; 64];
    for type_byte in 0u8..4 {
        for id in 0u8..=255 {
            for size in 0usize..=56 {
                buf[0] = type_byte;
                buf[1] = id;
                buf[6] = size as u8;
                let _ = decode(&buf[..size.min(64)]);
            }
        }
    }
}

/// A tiny fixed-capacity vec so the tests stay `no_std` friendly.
mod heapless_vec {
    #[derive(Debug, PartialEq, Default)]
    pub struct V {
        items: [u32; 8],
        len: usize,
    }
    impl V {
        pub fn of(s: &[u32]) -> Self {
            let mut v = V::default();
            for &x in s {
                v.items[v.len] = x;
                v.len += 1;
            }
            v
        }
    }
    impl FromIterator<u32> for V {
        fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
            let mut v = V::default();
            for x in iter {
                v.items[v.len] = x;
                v.len += 1;
            }
            v
        }
    }
}
