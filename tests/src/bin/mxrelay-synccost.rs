//! What a durable write costs on a disk, made the way the queue journal makes it and in two
//! other ways docs/benchmarks.md weighs: `COUNT` records of `SIZE` bytes (6000: about one group commit) into a
//! zero-filled file, as a recycled journal segment is, each durable before the next.
//!
//! usage: mxrelay-synccost DIR [COUNT=2000] [RUNS=3] [SIZE=6000]   (DIR on the disk the queue uses)
//!
//! * `pwrite + fdatasync`: the journal's way;
//! * `O_DIRECT | O_DSYNC`: each record written as the 4 KiB blocks that hold it;
//! * `2 writers`: two threads the journal's way at once, on separate halves of the file;
//! * `pwrite+fstat+fdatasync`: the journal's way with the file's metadata read before each
//!   sync, which the journal does only when it starts a segment: a file whose times were read
//!   gets a new modification time at the next write, and the sync then writes the inode too.
//!
//! Prints, per mode, medians of wall and CPU time per write (CPU from the kernel's run time of the
//! writing threads), of writes per second and of the disk's write requests per write (from
//! `/proc/diskstats` for the device that holds DIR, so other writers on that disk count too).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

const BLOCK: u64 = 4096;
const FILE_BYTES: u64 = 64 << 20;

/// Nanoseconds the calling thread has run, from `/proc/thread-self/schedstat`.
fn thread_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("/proc/thread-self/schedstat");
    stat.split_whitespace().next().and_then(|ns| ns.parse().ok()).expect("run time")
}

/// Runs `work` and returns the CPU time it took on this thread, in ns.
fn cpu_of(work: impl FnOnce()) -> u64 {
    let before = thread_cpu_ns();
    work();
    thread_cpu_ns() - before
}

/// `count` records from record `first` on, each made durable with `fdatasync`.
fn journal_way(file: &File, first: u64, count: u64, size: u64) {
    let record = vec![b'x'; size as usize];
    for i in first..first + count {
        file.write_all_at(&record, i * size).expect("write");
        file.sync_data().expect("fdatasync");
    }
}

/// The journal's way, with the file's metadata read before each `fdatasync`.
fn journal_way_reading_times(file: &File, count: u64, size: u64) {
    let record = vec![b'x'; size as usize];
    for i in 0..count {
        file.write_all_at(&record, i * size).expect("write");
        file.metadata().expect("fstat");
        file.sync_data().expect("fdatasync");
    }
}

/// Write requests the disk holding `dir` has completed, from `/proc/diskstats`; `None` when the
/// directory is on no block device listed there (tmpfs, overlay).
fn disk_writes(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev).to_string(), libc::minor(dev).to_string());
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    stats
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find_map(|f| (f.len() > 7 && f[0] == major && f[1] == minor).then(|| f[7].parse().ok()).flatten())
}

/// `count` records, each written through `O_DIRECT | O_DSYNC` as the blocks that hold it.
fn direct_way(path: &Path, count: u64, size: u64) {
    let file = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(path).expect("open O_DIRECT");
    let buffer = vec![b'x'; (size + 3 * BLOCK) as usize];
    // O_DIRECT needs a block-aligned buffer too; an aligned slice of a larger one does.
    let aligned = &buffer[buffer.as_ptr().align_offset(BLOCK as usize)..];
    for i in 0..count {
        let start = i * size / BLOCK * BLOCK;
        let end = (i * size + size).div_ceil(BLOCK) * BLOCK;
        file.write_all_at(&aligned[..(end - start) as usize], start).expect("write");
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        eprintln!("usage: mxrelay-synccost DIR [COUNT=2000] [RUNS=3] [SIZE=6000]");
        std::process::exit(2);
    };
    let number = |i: usize, default: u64| args.get(i).map_or(default, |a| a.parse().expect("a number"));
    let (count, runs, size) = (number(2, 2000), number(3, 3), number(4, 6000));
    assert!(
        size > 0 && count * size <= FILE_BYTES / 2,
        "COUNT × SIZE must be at most half the 64 MiB file (each writer of `2 writers` has half)"
    );
    let path = Path::new(dir).join("mxrelay-synccost.segment");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("create");
    let zeros = vec![0u8; 1 << 20];
    for offset in (0..FILE_BYTES).step_by(zeros.len()) {
        file.write_all_at(&zeros, offset).expect("fill");
    }
    file.sync_all().expect("sync");

    // Each mode returns the CPU time (ns) its writing threads used.
    let modes: [(&str, u64, &dyn Fn() -> u64); 4] = [
        ("pwrite + fdatasync", count, &|| cpu_of(|| journal_way(&file, 0, count, size))),
        ("O_DIRECT | O_DSYNC", count, &|| cpu_of(|| direct_way(&path, count, size))),
        ("2 writers", 2 * count, &|| {
            std::thread::scope(|s| {
                let second = s.spawn(|| cpu_of(|| journal_way(&file, FILE_BYTES / 2 / size, count, size)));
                cpu_of(|| journal_way(&file, 0, count, size)) + second.join().expect("second writer")
            })
        }),
        ("pwrite+fstat+fdatasync", count, &|| cpu_of(|| journal_way_reading_times(&file, count, size))),
    ];
    // Per mode: µs wall per write, µs CPU per write, writes per second, disk write requests
    // per write; the modes alternate.
    let mut figures = vec![(Vec::new(), Vec::new(), Vec::new(), Vec::new()); modes.len()];
    for _ in 0..runs {
        for ((_, writes, run), (wall, cpu, rate, disk)) in modes.iter().zip(figures.iter_mut()) {
            let disk_before = disk_writes(Path::new(dir));
            let started = Instant::now();
            let cpu_ns = run();
            let seconds = started.elapsed().as_secs_f64();
            wall.push(seconds * 1e6 / *writes as f64);
            cpu.push(cpu_ns as f64 / 1e3 / *writes as f64);
            rate.push(*writes as f64 / seconds);
            if let (Some(before), Some(after)) = (disk_before, disk_writes(Path::new(dir))) {
                disk.push((after - before) as f64 / *writes as f64);
            }
        }
    }
    for ((name, ..), (wall, cpu, rate, disk)) in modes.iter().zip(figures) {
        let disk = if disk.is_empty() { "n/a".to_string() } else { format!("{:.2}", median(disk)) };
        println!(
            "{name:<22} wall {:6.1} µs/write   CPU {:5.1} µs/write   {:7.0} writes/s   {disk} disk writes/write",
            median(wall),
            median(cpu),
            median(rate)
        );
    }
    let _ = std::fs::remove_file(&path);
}
