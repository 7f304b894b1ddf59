//! The register map: one decoded Modbus request in, one response or
//! exception out, applied to the rooms.
//!
//! In: a [`Request`] and the rooms. Out: a [`Response`] or an
//! [`ExceptionCode`]; a write changes the rooms only if the whole request is
//! valid.
//!
//! The map itself is documented on the [`modbus`](super) module.

use std::ops::Range;

use tokio_modbus::{ExceptionCode, Request, Response};

use super::room::Room;

/// Addresses per room, in every table: room `k` starts at `k * BLOCK`.
pub const BLOCK: u16 = 16;

/// Most rooms a simulation can have: all of the 16-bit address space.
pub const MAX_ROOMS: usize = 0x1_0000 / BLOCK as usize;

/// Offset of the temperature × 10 (`i16`), in the input and holding registers.
pub const TEMPERATURE_TENTHS: u16 = 0;

/// Offset of the heater power percentage, in the holding registers.
pub const HEATER_POWER: u16 = 1;

/// Offset of the temperature as `f32` (two words, high word first), in the input registers.
pub const TEMPERATURE_F32: u16 = 2;

/// Offset of the heater, in the coils (and its feedback in the discrete inputs).
pub const HEATER: u16 = 0;

/// Modbus limit on bits per read (function codes 1 and 2).
const MAX_READ_BITS: usize = 2000;
/// Modbus limit on registers per read (function codes 3 and 4).
const MAX_READ_REGISTERS: usize = 125;
/// Modbus limit on coils per write (function code 15).
const MAX_WRITE_COILS: usize = 1968;
/// Modbus limit on registers per write (function code 16).
const MAX_WRITE_REGISTERS: usize = 123;

/// The room a request's first address falls in (which may not exist), or
/// `None` for a request without an address: it picks the fault that applies.
pub(crate) fn first_room(request: &Request<'_>) -> Option<usize> {
    use Request::*;
    match request {
        ReadCoils(address, _)
        | ReadDiscreteInputs(address, _)
        | ReadInputRegisters(address, _)
        | ReadHoldingRegisters(address, _)
        | WriteSingleCoil(address, _)
        | WriteSingleRegister(address, _)
        | WriteMultipleCoils(address, _)
        | WriteMultipleRegisters(address, _) => Some(usize::from(*address / BLOCK)),
        _ => None,
    }
}

/// The rooms whose heater coil a write request addresses, valid or not.
pub(crate) fn coil_write_rooms(request: &Request<'_>) -> Range<usize> {
    let (start, count) = match request {
        Request::WriteSingleCoil(address, _) => (usize::from(*address), 1),
        Request::WriteMultipleCoils(address, coils) => (usize::from(*address), coils.len()),
        _ => return 0..0,
    };
    let block = usize::from(BLOCK);
    let end = (start + count).min(0x1_0000);
    // The heater sits at offset 0 (HEATER), so room r's coil is r * BLOCK:
    // the rooms are those with r * BLOCK in start..end.
    let first = start.div_ceil(block);
    let last = end.div_ceil(block);
    first..last.max(first)
}

/// Serves `request` against `rooms`.
pub(crate) fn handle(rooms: &mut [Room], request: &Request<'_>) -> Result<Response, ExceptionCode> {
    use Request::*;
    match request {
        ReadCoils(address, count) => read_bits(rooms, *address, *count).map(Response::ReadCoils),
        ReadDiscreteInputs(address, count) => read_bits(rooms, *address, *count).map(Response::ReadDiscreteInputs),
        ReadInputRegisters(address, count) => {
            read_registers(rooms, *address, *count, input_register).map(Response::ReadInputRegisters)
        }
        ReadHoldingRegisters(address, count) => {
            read_registers(rooms, *address, *count, holding_register).map(Response::ReadHoldingRegisters)
        }
        WriteSingleCoil(address, on) => {
            write_coils(rooms, *address, &[*on])?;
            Ok(Response::WriteSingleCoil(*address, *on))
        }
        WriteMultipleCoils(address, coils) => {
            write_coils(rooms, *address, coils)?;
            Ok(Response::WriteMultipleCoils(*address, quantity(coils.len())))
        }
        WriteSingleRegister(address, value) => {
            write_registers(rooms, *address, &[*value])?;
            Ok(Response::WriteSingleRegister(*address, *value))
        }
        WriteMultipleRegisters(address, values) => {
            write_registers(rooms, *address, values)?;
            Ok(Response::WriteMultipleRegisters(*address, quantity(values.len())))
        }
        _ => Err(ExceptionCode::IllegalFunction),
    }
}

/// `len` as a Modbus quantity; callers have checked it against the limits.
fn quantity(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

/// The addresses `address .. address + count`, after checking the quantity
/// (exception 3) and that they fit the address space (exception 2).
fn span(address: u16, count: usize, max: usize) -> Result<Range<usize>, ExceptionCode> {
    if count == 0 || count > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let start = usize::from(address);
    let end = start + count;
    if end > 0x1_0000 {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(start..end)
}

/// Splits an address into its room index and the offset within the block.
fn locate(address: usize) -> (usize, u16) {
    let block = usize::from(BLOCK);
    (address / block, (address % block) as u16)
}

/// The room at `index`, or exception 2 if there is none.
fn room(rooms: &[Room], index: usize) -> Result<&Room, ExceptionCode> {
    rooms.get(index).ok_or(ExceptionCode::IllegalDataAddress)
}

fn read_bits(rooms: &[Room], address: u16, count: u16) -> Result<Vec<bool>, ExceptionCode> {
    span(address, usize::from(count), MAX_READ_BITS)?
        .map(|address| {
            let (index, offset) = locate(address);
            let room = room(rooms, index)?;
            match offset {
                HEATER => Ok(room.heater),
                _ => Err(ExceptionCode::IllegalDataAddress),
            }
        })
        .collect()
}

fn read_registers(
    rooms: &[Room],
    address: u16,
    count: u16,
    read: fn(&Room, u16) -> Option<u16>,
) -> Result<Vec<u16>, ExceptionCode> {
    span(address, usize::from(count), MAX_READ_REGISTERS)?
        .map(|address| {
            let (index, offset) = locate(address);
            read(room(rooms, index)?, offset).ok_or(ExceptionCode::IllegalDataAddress)
        })
        .collect()
}

fn input_register(room: &Room, offset: u16) -> Option<u16> {
    let [high, low] = room.temperature_f32_words();
    match offset {
        TEMPERATURE_TENTHS => Some(room.temperature_tenths()),
        TEMPERATURE_F32 => Some(high),
        o if o == TEMPERATURE_F32 + 1 => Some(low),
        _ => None,
    }
}

fn holding_register(room: &Room, offset: u16) -> Option<u16> {
    match offset {
        TEMPERATURE_TENTHS => Some(room.temperature_tenths()),
        HEATER_POWER => Some(room.power),
        _ => None,
    }
}

fn write_coils(rooms: &mut [Room], address: u16, values: &[bool]) -> Result<(), ExceptionCode> {
    let span = span(address, values.len(), MAX_WRITE_COILS)?;
    for address in span.clone() {
        let (index, offset) = locate(address);
        room(rooms, index)?;
        if offset != HEATER {
            return Err(ExceptionCode::IllegalDataAddress);
        }
    }
    for (address, on) in span.zip(values) {
        if let Some(room) = rooms.get_mut(locate(address).0) {
            room.heater = *on;
        }
    }
    Ok(())
}

fn write_registers(rooms: &mut [Room], address: u16, values: &[u16]) -> Result<(), ExceptionCode> {
    let span = span(address, values.len(), MAX_WRITE_REGISTERS)?;
    // Addresses first, then values: the order the Modbus spec checks them in.
    for address in span.clone() {
        let (index, offset) = locate(address);
        room(rooms, index)?;
        if offset != HEATER_POWER {
            // Includes the temperature at offset 0: read-only, so not a writable address.
            return Err(ExceptionCode::IllegalDataAddress);
        }
    }
    if values.iter().any(|power| *power > 100) {
        return Err(ExceptionCode::IllegalDataValue);
    }
    for (address, power) in span.zip(values) {
        if let Some(room) = rooms.get_mut(locate(address).0) {
            room.power = *power;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn rooms(n: usize) -> Vec<Room> {
        (0..n).map(|k| Room::new(1, k, 10.0)).collect()
    }

    #[test]
    fn coil_write_rooms_covers_each_heater_once() {
        assert_eq!(coil_write_rooms(&Request::WriteSingleCoil(32, true)), 2..3);
        assert_eq!(coil_write_rooms(&Request::WriteSingleCoil(33, true)), 3..3);
        let coils: Cow<'_, [bool]> = Cow::Owned(vec![false; 17]);
        assert_eq!(coil_write_rooms(&Request::WriteMultipleCoils(0, coils.clone())), 0..2);
        assert_eq!(coil_write_rooms(&Request::WriteMultipleCoils(1, coils)), 1..2);
        let all: Cow<'_, [bool]> = Cow::Owned(vec![false; 1968]);
        assert_eq!(coil_write_rooms(&Request::WriteMultipleCoils(65535, all)), 4096..4096);
        assert_eq!(coil_write_rooms(&Request::ReadCoils(0, 1)), 0..0);
    }

    #[test]
    fn a_span_over_a_gap_is_illegal_address() {
        let mut rooms = rooms(2);
        assert_eq!(handle(&mut rooms, &Request::ReadInputRegisters(0, 4)), Err(ExceptionCode::IllegalDataAddress));
        let f32_words = handle(&mut rooms, &Request::ReadInputRegisters(2, 2));
        assert!(matches!(f32_words, Ok(Response::ReadInputRegisters(w)) if w.len() == 2));
        assert_eq!(handle(&mut rooms, &Request::ReadCoils(0, 2)), Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(handle(&mut rooms, &Request::ReadCoils(32, 1)), Err(ExceptionCode::IllegalDataAddress));
    }

    #[test]
    fn a_rejected_write_changes_nothing() {
        let mut rooms = rooms(2);
        let values: Cow<'_, [u16]> = Cow::Owned(vec![50, 101]);
        // 17 and 18: room 1's power and an undefined register.
        assert_eq!(
            handle(&mut rooms, &Request::WriteMultipleRegisters(17, values)),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(handle(&mut rooms, &Request::WriteSingleRegister(17, 101)), Err(ExceptionCode::IllegalDataValue));
        assert!(rooms.iter().all(|room| room.power == 100));
        assert_eq!(
            handle(&mut rooms, &Request::WriteSingleRegister(17, 40)),
            Ok(Response::WriteSingleRegister(17, 40))
        );
        assert_eq!(rooms.iter().map(|room| room.power).collect::<Vec<_>>(), [100, 40]);
    }

    #[test]
    fn quantities_are_checked_before_addresses() {
        let mut rooms = rooms(1);
        assert_eq!(handle(&mut rooms, &Request::ReadHoldingRegisters(60000, 0)), Err(ExceptionCode::IllegalDataValue));
        assert_eq!(handle(&mut rooms, &Request::ReadCoils(60000, 2001)), Err(ExceptionCode::IllegalDataValue));
        assert_eq!(handle(&mut rooms, &Request::ReadCoils(65535, 2)), Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(handle(&mut rooms, &Request::ReportServerId), Err(ExceptionCode::IllegalFunction));
    }
}
