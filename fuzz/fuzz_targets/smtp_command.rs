//! SMTP command lines as the relay parses them: never a panic, whatever the bytes. A MAIL or
//! RCPT whose DSN parameters the relay keeps is passed on as parameters that read back as
//! the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay_dsn::{DsnRequest, RcptDsn};
use smtp_proto::Request;

fn parse(line: &str) -> Option<Request<std::borrow::Cow<'_, str>>> {
    Request::parse(&mut line.as_bytes().iter()).ok()
}

fuzz_target!(|line: &[u8]| {
    let mut line = line.to_vec();
    line.extend_from_slice(b"\r\n");
    match Request::parse(&mut line.iter()) {
        Ok(Request::Mail { from }) => {
            let Ok(Some(request)) = DsnRequest::from_mail(from.flags, from.env_id.as_deref()) else {
                return;
            };
            let again = format!("MAIL FROM:<a@b.test>{}\r\n", request.mail_params());
            let Some(Request::Mail { from }) = parse(&again) else {
                panic!("{again:?} does not parse");
            };
            assert_eq!(DsnRequest::from_mail(from.flags, from.env_id.as_deref()), Ok(Some(request)), "{again:?}");
        }
        Ok(Request::Rcpt { to }) => {
            let Ok(Some(rcpt)) = RcptDsn::from_rcpt(to.flags, to.orcpt.as_deref()) else {
                return;
            };
            let mut request = DsnRequest::default();
            request.recipients.insert("a@b.test".into(), rcpt.clone());
            let again = format!("RCPT TO:<a@b.test>{}\r\n", request.rcpt_params("a@b.test"));
            let Some(Request::Rcpt { to }) = parse(&again) else {
                panic!("{again:?} does not parse");
            };
            assert_eq!(RcptDsn::from_rcpt(to.flags, to.orcpt.as_deref()), Ok(Some(rcpt)), "{again:?}");
        }
        _ => {}
    }
});
