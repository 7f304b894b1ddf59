//! The Modbus simulator seen by a real tokio-modbus TCP client over 127.0.0.1.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use synod_sim::modbus::{self, BLOCK, Fault, SimConfig, SimError, SimHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_modbus::client::{Context, tcp};
use tokio_modbus::prelude::*;

/// Upper bound on anything that should answer: far above a loopback round trip.
const ANSWER: Duration = Duration::from_secs(5);

fn manual(rooms: usize) -> SimConfig {
    SimConfig { rooms, manual_clock: true, ..SimConfig::default() }
}

async fn start(config: SimConfig) -> Result<SimHandle> {
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    Ok(modbus::start(listen, config).await?)
}

async fn connect(sim: &SimHandle) -> Result<Context> {
    Ok(timeout(ANSWER, tcp::connect(sim.addr())).await??)
}

/// Input register 16k (temperature × 10) of `room`, decoded.
async fn read_tenths(ctx: &mut Context, room: usize) -> Result<f64> {
    let words = timeout(ANSWER, ctx.read_input_registers(address(room, 0), 1)).await???;
    Ok(f64::from(words[0] as i16) / 10.0)
}

/// Input registers 16k+2, 16k+3 (temperature as f32, high word first), decoded.
async fn read_f32(ctx: &mut Context, room: usize) -> Result<f32> {
    let words = timeout(ANSWER, ctx.read_input_registers(address(room, 2), 2)).await???;
    Ok(f32::from_bits(u32::from(words[0]) << 16 | u32::from(words[1])))
}

/// The address of `offset` in `room`'s block (saturating, to ask past the end).
fn address(room: usize, offset: u16) -> u16 {
    u16::try_from(room).ok().and_then(|room| room.checked_mul(BLOCK)?.checked_add(offset)).unwrap_or(u16::MAX)
}

fn temperature(sim: &SimHandle, room: usize) -> Result<f64> {
    sim.temperature(room).context("no such room")
}

fn assert_close(actual: f64, expected: f64) {
    assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
}

#[tokio::test]
async fn both_encodings_agree_with_the_model() -> Result<()> {
    let sim = start(manual(3)).await?;
    let mut ctx = connect(&sim).await?;
    for room in 0..3 {
        let t = temperature(&sim, room)?;
        assert!((15.0..=24.9 + 1e-9).contains(&t), "room {room} starts at {t}");
        assert!((read_tenths(&mut ctx, room).await? - t).abs() <= 0.05 + 1e-9);
        assert!((f64::from(read_f32(&mut ctx, room).await?) - t).abs() < 1e-4);
        let holding = timeout(ANSWER, ctx.read_holding_registers(address(room, 0), 2)).await???;
        let input = timeout(ANSWER, ctx.read_input_registers(address(room, 0), 1)).await???;
        assert_eq!(holding, [input[0], 100], "holding 16k mirrors input 16k; 16k+1 is the power");
    }

    assert!(sim.set_temperature(1, -3.2));
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(16, 1)).await???, [0xFFE0]);
    assert_eq!(read_f32(&mut ctx, 1).await?, -3.2f32);
    assert!(sim.set_temperature(2, 21.5));
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(32, 1)).await???, [215]);
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(34, 2)).await???, [0x41AC, 0x0000]);
    assert!(!sim.set_temperature(3, 20.0));
    assert_eq!(sim.temperature(3), None);

    // Every unit id sees the same map.
    ctx.set_slave(Slave(42));
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(32, 1)).await???, [215]);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn heater_coil_heats_and_cooling_stops_at_ambient() -> Result<()> {
    let sim = start(manual(2)).await?;
    let mut ctx = connect(&sim).await?;
    let t0 = temperature(&sim, 1)?;

    timeout(ANSWER, ctx.write_single_coil(16, true)).await???;
    assert_eq!(sim.heater(1), Some(true));
    assert_eq!(sim.heater(0), Some(false));
    assert_eq!(sim.coil_writes(1), 1);
    assert_eq!(sim.coil_writes(0), 0);
    assert_eq!(timeout(ANSWER, ctx.read_coils(16, 1)).await???, [true]);
    assert_eq!(timeout(ANSWER, ctx.read_discrete_inputs(16, 1)).await???, [true]);

    sim.step(Duration::from_secs(2));
    assert_close(temperature(&sim, 1)?, t0 + 0.5 * 2.0);
    assert!((read_tenths(&mut ctx, 1).await? - (t0 + 1.0)).abs() <= 0.05 + 1e-9);

    // Half power, half the rate.
    timeout(ANSWER, ctx.write_single_register(17, 50)).await???;
    assert_eq!(sim.heater_power(1), Some(50));
    sim.step(Duration::from_secs(2));
    assert_close(temperature(&sim, 1)?, t0 + 1.5);

    timeout(ANSWER, ctx.write_multiple_coils(16, &[false])).await???;
    assert_eq!(sim.heater(1), Some(false));
    assert_eq!(sim.coil_writes(1), 2);
    assert_eq!(timeout(ANSWER, ctx.read_discrete_inputs(16, 1)).await???, [false]);
    sim.step(Duration::from_secs(1));
    assert_close(temperature(&sim, 1)?, t0 + 1.5 - 0.25);
    sim.step(Duration::from_secs(3600));
    assert_eq!(sim.temperature(1), Some(10.0));
    sim.step(Duration::from_secs(10));
    assert_eq!(sim.temperature(1), Some(10.0));
    assert_eq!(read_tenths(&mut ctx, 1).await?, 10.0);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn illegal_requests_get_the_documented_exceptions() -> Result<()> {
    let sim = start(manual(2)).await?;
    let mut ctx = connect(&sim).await?;
    const ADDRESS: Option<ExceptionCode> = Some(ExceptionCode::IllegalDataAddress);
    const VALUE: Option<ExceptionCode> = Some(ExceptionCode::IllegalDataValue);
    const FUNCTION: Option<ExceptionCode> = Some(ExceptionCode::IllegalFunction);

    // Unknown addresses: a gap in a block, past the last room, a spare coil.
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(1, 1)).await??.err(), ADDRESS);
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(0, 4)).await??.err(), ADDRESS);
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(32, 1)).await??.err(), ADDRESS);
    assert_eq!(timeout(ANSWER, ctx.read_holding_registers(2, 1)).await??.err(), ADDRESS);
    assert_eq!(timeout(ANSWER, ctx.read_coils(1, 1)).await??.err(), ADDRESS);
    assert_eq!(timeout(ANSWER, ctx.write_single_coil(33, true)).await??.err(), ADDRESS);

    // Too many (or no) registers.
    assert_eq!(timeout(ANSWER, ctx.read_holding_registers(0, 126)).await??.err(), VALUE);
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(0, 0)).await??.err(), VALUE);
    assert_eq!(timeout(ANSWER, ctx.read_coils(0, 2001)).await??.err(), VALUE);
    // 1969 coils still fit a PDU (124 registers do not: both tokio-modbus ends refuse them).
    assert_eq!(timeout(ANSWER, ctx.write_multiple_coils(0, &[false; 1969])).await??.err(), VALUE);

    // Holding 16k is the read-only temperature.
    assert_eq!(timeout(ANSWER, ctx.write_single_register(0, 200)).await??.err(), ADDRESS);
    assert_eq!(timeout(ANSWER, ctx.write_multiple_registers(0, &[200, 50])).await??.err(), ADDRESS);

    // Power is a percentage.
    assert_eq!(timeout(ANSWER, ctx.write_single_register(1, 101)).await??.err(), VALUE);
    assert_eq!(timeout(ANSWER, ctx.write_multiple_registers(17, &[1000])).await??.err(), VALUE);
    assert_eq!(sim.heater_power(0), Some(100));
    assert_eq!(sim.heater_power(1), Some(100));
    timeout(ANSWER, ctx.write_multiple_registers(17, &[0])).await???;
    assert_eq!(sim.heater_power(1), Some(0));

    // Function codes outside 1-6, 15, 16.
    assert_eq!(timeout(ANSWER, ctx.read_write_multiple_registers(1, 1, 1, &[5])).await??.err(), FUNCTION);
    assert_eq!(timeout(ANSWER, ctx.masked_write_register(1, 0xFFFF, 0)).await??.err(), FUNCTION);

    // The connection survived all of that.
    assert_eq!(timeout(ANSWER, ctx.read_holding_registers(1, 1)).await???, [100]);
    assert_eq!(sim.requests(), 18);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn delay_fault_answers_late_and_only_for_its_room() -> Result<()> {
    let delay = Duration::from_millis(400);
    let sim = start(manual(2)).await?;
    let mut slow = connect(&sim).await?;
    let mut fast = connect(&sim).await?;
    assert!(sim.set_fault(Some(0), Fault::Delay(delay)));

    let slow_read = tokio::spawn(async move {
        let started = Instant::now();
        let words = timeout(ANSWER, slow.read_input_registers(0, 1)).await;
        (started.elapsed(), words.map(|words| words.map(|words| words.map(|words| words.len()))))
    });
    let started = Instant::now();
    read_tenths(&mut fast, 1).await?;
    let fast_elapsed = started.elapsed();
    let (slow_elapsed, words) = slow_read.await?;
    assert_eq!(words???, 1);
    assert!(slow_elapsed >= delay, "answered after {slow_elapsed:?}, before the {delay:?} delay");
    assert!(fast_elapsed < delay, "room 1 took {fast_elapsed:?}");

    // The write takes effect with the late answer.
    let mut ctx = connect(&sim).await?;
    let started = Instant::now();
    timeout(ANSWER, ctx.write_single_coil(0, true)).await???;
    assert!(started.elapsed() >= delay);
    assert_eq!(sim.heater(0), Some(true));

    sim.clear_faults();
    let started = Instant::now();
    read_tenths(&mut ctx, 0).await?;
    assert!(started.elapsed() < delay, "still delayed after clear_faults: {:?}", started.elapsed());
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn drop_fault_never_answers_but_keeps_the_connection() -> Result<()> {
    let sim = start(manual(2)).await?;
    let mut ctx = connect(&sim).await?;
    let mut other = connect(&sim).await?;
    assert!(sim.set_fault(Some(0), Fault::Drop));

    let silence = Duration::from_millis(300);
    assert!(timeout(silence, ctx.read_input_registers(0, 1)).await.is_err(), "a dropped request was answered");
    // A dropped write is counted (it arrived) but not applied.
    assert!(timeout(silence, ctx.write_single_coil(0, true)).await.is_err());
    assert_eq!(sim.coil_writes(0), 1);
    assert_eq!(sim.heater(0), Some(false));
    assert_eq!(sim.requests(), 2);

    // Another room, on another connection, answers at once.
    let started = Instant::now();
    read_tenths(&mut other, 1).await?;
    assert!(started.elapsed() < silence, "room 1 took {:?}", started.elapsed());

    sim.clear_faults();
    let t = temperature(&sim, 0)?;
    assert!((read_tenths(&mut ctx, 0).await? - t).abs() <= 0.05 + 1e-9, "the connection stayed usable");
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn exception_fault_answers_with_its_code() -> Result<()> {
    let sim = start(manual(2)).await?;
    let mut ctx = connect(&sim).await?;
    assert!(sim.set_fault(Some(0), Fault::Exception(4)));
    let failure = Some(ExceptionCode::ServerDeviceFailure);
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(0, 1)).await??.err(), failure);
    assert_eq!(timeout(ANSWER, ctx.write_single_coil(0, true)).await??.err(), failure);
    assert_eq!(sim.heater(0), Some(false), "a faulted write is not applied");
    assert_eq!(sim.coil_writes(0), 1, "but it is counted");
    read_tenths(&mut ctx, 1).await?;

    // Global: every room, and addresses in no room.
    assert!(sim.set_fault(None, Fault::Exception(6)));
    let busy = Err(ExceptionCode::ServerDeviceBusy);
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(16, 1)).await??, busy);
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(0, 1)).await??, busy);
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(0xFFF0, 1)).await??, busy);
    assert!(!sim.set_fault(Some(2), Fault::None));

    sim.clear_faults();
    read_tenths(&mut ctx, 0).await?;
    read_tenths(&mut ctx, 1).await?;
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn disconnect_fault_closes_the_connection() -> Result<()> {
    let sim = start(manual(2)).await?;
    assert!(sim.set_fault(Some(1), Fault::Disconnect));

    // Raw socket: a read-input-registers request for room 1 is met with end-of-file.
    let mut raw = timeout(ANSWER, TcpStream::connect(sim.addr())).await??;
    let request = [0x00, 0x01, 0x00, 0x00, 0x00, 0x06, 0x01, 0x04, 0x00, 0x10, 0x00, 0x01];
    raw.write_all(&request).await?;
    let mut reply = Vec::new();
    let read = timeout(ANSWER, raw.read_to_end(&mut reply)).await??;
    assert_eq!(read, 0, "expected the connection closed, got {reply:02x?}");

    // The client sees a transport error, and the connection stays dead.
    let mut ctx = connect(&sim).await?;
    assert!(timeout(ANSWER, ctx.read_input_registers(16, 1)).await?.is_err());
    assert!(timeout(ANSWER, ctx.read_input_registers(0, 1)).await?.is_err());

    // Other rooms on other connections are unaffected; clearing restores room 1.
    let mut fresh = connect(&sim).await?;
    read_tenths(&mut fresh, 0).await?;
    sim.clear_faults();
    read_tenths(&mut fresh, 1).await?;
    let mut after = connect(&sim).await?;
    read_tenths(&mut after, 1).await?;
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn seeds_decide_the_initial_temperatures_and_steps_the_rest() -> Result<()> {
    async fn trajectory(seed: u64) -> Result<Vec<f64>> {
        let sim = start(SimConfig { seed, ..manual(20) }).await?;
        let mut ctx = connect(&sim).await?;
        let mut temps: Vec<f64> = (0..20).filter_map(|k| sim.temperature(k)).collect();
        for k in (0..20).step_by(3) {
            timeout(ANSWER, ctx.write_single_coil(address(k, 0), true)).await???;
        }
        for ms in [100, 250, 1000, 3] {
            sim.step(Duration::from_millis(ms));
        }
        temps.extend((0..20).filter_map(|k| sim.temperature(k)));
        sim.shutdown().await;
        Ok(temps)
    }
    let a = trajectory(1).await?;
    let b = trajectory(1).await?;
    let c = trajectory(2).await?;
    assert_eq!(a.len(), 40);
    assert_eq!(a, b, "same seed, same steps: same temperatures, bit for bit");
    assert_ne!(&a[..20], &c[..20], "seeds 1 and 2 start the same");
    Ok(())
}

#[tokio::test]
async fn a_thousand_rooms_all_answer_concurrent_clients() -> Result<()> {
    const ROOMS: usize = 1000;
    const CLIENTS: usize = 8;
    let sim = start(manual(ROOMS)).await?;
    timeout(Duration::from_secs(60), async {
        let mut ctx = connect(&sim).await?;
        for room in 0..ROOMS {
            let t = temperature(&sim, room)?;
            let read = read_tenths(&mut ctx, room).await?;
            if (read - t).abs() > 0.05 + 1e-9 {
                bail!("room {room}: read {read}, model {t}");
            }
        }
        assert_eq!(
            timeout(ANSWER, ctx.read_input_registers(address(ROOMS, 0), 1)).await??,
            Err(ExceptionCode::IllegalDataAddress)
        );

        let mut clients = Vec::new();
        for client in 0..CLIENTS {
            let mut ctx = connect(&sim).await?;
            clients.push(tokio::spawn(async move {
                for room in (client..ROOMS).step_by(CLIENTS) {
                    timeout(ANSWER, ctx.write_single_coil(address(room, 0), true)).await???;
                    let feedback = timeout(ANSWER, ctx.read_discrete_inputs(address(room, 0), 1)).await???;
                    if feedback != [true] {
                        bail!("room {room}: heater feedback {feedback:?}");
                    }
                }
                anyhow::Ok(())
            }));
        }
        for client in clients {
            client.await??;
        }
        anyhow::Ok(())
    })
    .await??;
    for room in 0..ROOMS {
        assert_eq!(sim.heater(room), Some(true), "room {room}");
        assert_eq!(sim.coil_writes(room), 1, "room {room}");
    }
    assert_eq!(sim.requests(), (ROOMS + 1 + 2 * ROOMS) as u64);
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_last_of_4096_rooms_is_addressable() -> Result<()> {
    let sim = start(manual(modbus::MAX_ROOMS)).await?;
    let mut ctx = connect(&sim).await?;
    let t = temperature(&sim, 4095)?;
    assert!((f64::from(read_f32(&mut ctx, 4095).await?) - t).abs() < 1e-4);
    assert_eq!(timeout(ANSWER, ctx.read_input_registers(0xFFF3, 1)).await???.len(), 1);
    assert_eq!(
        timeout(ANSWER, ctx.read_input_registers(0xFFF3, 2)).await??.map(|_| ()),
        Err(ExceptionCode::IllegalDataAddress)
    );
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_clock_advances_in_real_time() -> Result<()> {
    let config = SimConfig { heat_rate_c_per_s: 20.0, tick: Duration::from_millis(10), ..SimConfig::default() };
    let sim = start(config).await?;
    let mut ctx = connect(&sim).await?;
    let t0 = temperature(&sim, 0)?;
    timeout(ANSWER, ctx.write_single_coil(0, true)).await???;
    let mut warmed = false;
    for _ in 0..250 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if read_tenths(&mut ctx, 0).await? >= t0 + 1.0 {
            warmed = true;
            break;
        }
    }
    assert!(warmed, "room 0 did not warm by 1 °C in 5 s at 20 °C/s: {:?}", sim.temperature(0));
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn shutdown_stops_listening_and_closes_connections() -> Result<()> {
    let sim = start(manual(1)).await?;
    let mut ctx = connect(&sim).await?;
    read_tenths(&mut ctx, 0).await?;
    sim.shutdown().await;
    assert!(TcpStream::connect(sim.addr()).await.is_err(), "still accepting after shutdown");
    assert!(timeout(ANSWER, ctx.read_input_registers(0, 1)).await?.is_err(), "still serving after shutdown");
    assert_eq!(sim.temperature(0).map(|t| t > 0.0), Some(true), "the handle still reads the state");
    sim.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn bad_addresses_and_configs_are_errors_that_say_why() -> Result<()> {
    let sim = start(manual(1)).await?;
    let err = modbus::start(sim.addr(), manual(1)).await.err().context("bound the same port twice")?;
    assert!(matches!(err, SimError::Bind { addr, .. } if addr == sim.addr()));
    assert!(err.to_string().contains(&sim.addr().to_string()), "{err}");

    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    for rooms in [0, modbus::MAX_ROOMS + 1] {
        let err = modbus::start(listen, manual(rooms)).await.err().context("accepted a bad room count")?;
        assert!(matches!(err, SimError::InvalidConfig { .. }), "{err}");
        assert!(err.to_string().contains("rooms"), "{err}");
    }
    let zero_tick = SimConfig { tick: Duration::ZERO, ..SimConfig::default() };
    assert!(matches!(modbus::start(listen, zero_tick).await, Err(SimError::InvalidConfig { .. })));
    sim.shutdown().await;
    Ok(())
}
