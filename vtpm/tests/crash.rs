//! kill -9 of the vtpm at 100 random moments during a burst of NV writes: every restart
//! loads, and the NV index holds the last acknowledged value or the one being written.

mod common;

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use xvtpm_tests::tpm2::{self, TcpTpm};

const INDEX: u32 = 0x0150_0020;
const SIZE: u16 = 16;

fn value(n: u64) -> Vec<u8> {
    let mut v = n.to_be_bytes().to_vec();
    v.extend_from_slice(&(!n).to_be_bytes());
    v
}

fn read_value(t: &mut TcpTpm) -> u64 {
    let rsp = t.transmit(&tpm2::nv_read(INDEX, SIZE)).expect("nv_read");
    assert_eq!(tpm2::rc(&rsp), 0, "NV_Read rc {:#x}", tpm2::rc(&rsp));
    let data = tpm2::nv_read_data(&rsp).expect("data");
    let n = u64::from_be_bytes(data[..8].try_into().expect("8"));
    assert_eq!(data, value(n), "the index holds a whole value, never a mix");
    n
}

#[test]
fn kill_9_during_nv_writes_loses_nothing_acknowledged() {
    let dir = std::env::temp_dir().join(format!("xvtpm-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (state, key) = (dir.join("state"), dir.join("key"));
    std::fs::write(&key, [9u8; 32]).expect("key");
    common::create(&state, &key);
    {
        let vtpm = common::start(&state, &key, 0);
        let mut t = TcpTpm::connect(vtpm.port).expect("connect");
        assert_eq!(tpm2::rc(&t.transmit(&tpm2::nv_define(INDEX, SIZE)).expect("define")), 0);
        assert_eq!(tpm2::rc(&t.transmit(&tpm2::nv_write(INDEX, &value(0))).expect("write")), 0);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut acked = 0u64;
    let mut total_writes = 0u64;
    for round in 1..=100u32 {
        let mut vtpm = common::start(&state, &key, round);
        let mut t = TcpTpm::connect(vtpm.port).expect("connect");
        // Every restart loads, and holds what was acknowledged (or the write in flight).
        let now = read_value(&mut t);
        assert!(now == acked || now == acked + 1, "round {round}: index holds {now}, last acknowledged {acked}");
        acked = now;
        let deadline = Instant::now() + Duration::from_micros(rng.gen_range(1_000..40_000));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            vtpm.kill();
        });
        loop {
            match t.transmit(&tpm2::nv_write(INDEX, &value(acked + 1))) {
                Ok(rsp) if tpm2::rc(&rsp) == 0 => {
                    acked += 1;
                    total_writes += 1;
                }
                Ok(rsp) => panic!("round {round}: NV_Write rc {:#x}", tpm2::rc(&rsp)),
                Err(_) => break, // killed mid-command
            }
        }
        killer.join().expect("killer");
    }
    assert!(total_writes > 100, "the burst wrote only {total_writes} values");
    let vtpm = common::start(&state, &key, 1000);
    let mut t = TcpTpm::connect(vtpm.port).expect("connect");
    let last = read_value(&mut t);
    assert!(last == acked || last == acked + 1);
    drop(vtpm);
    let _ = std::fs::remove_dir_all(&dir);
}
