//! A console client: cookies kept by hand, redirects not followed.

use reqwest::redirect::Policy;

/// A console client that keeps its cookies by hand and never follows redirects.
pub struct Web {
    base: String,
    http: reqwest::Client,
    cookies: Vec<(String, String)>,
}

pub struct Page {
    pub status: u16,
    pub location: String,
    pub set_cookie: Vec<String>,
    pub body: String,
}

pub fn field(body: &str, name: &str) -> String {
    let key = format!("name=\"{name}\" value=\"");
    let i = body
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} field in {body}"))
        + key.len();
    body[i..].split('"').next().unwrap().to_owned()
}

impl Web {
    pub fn new(base: &str) -> Web {
        Web {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .build()
                .unwrap(),
            cookies: Vec::new(),
        }
    }

    pub async fn send(&mut self, rb: reqwest::RequestBuilder) -> Page {
        let cookie: Vec<String> = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let r = rb.header("cookie", cookie.join("; ")).send().await.unwrap();
        let set_cookie: Vec<String> = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        for c in &set_cookie {
            let kv = c.split(';').next().unwrap();
            let (k, v) = kv.split_once('=').unwrap();
            self.cookies.retain(|(x, _)| x != k);
            if !v.is_empty() {
                self.cookies.push((k.to_owned(), v.to_owned()));
            }
        }
        Page {
            status: r.status().as_u16(),
            location: r
                .headers()
                .get("location")
                .map(|l| l.to_str().unwrap().to_owned())
                .unwrap_or_default(),
            set_cookie,
            body: r.text().await.unwrap(),
        }
    }

    pub async fn get(&mut self, path: &str) -> Page {
        let rb = self.http.get(format!("{}{path}", self.base));
        self.send(rb).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let rb = self.http.post(format!("{}{path}", self.base)).form(form);
        self.send(rb).await
    }

    pub async fn login(&mut self, user: &str, pw: &str) -> Page {
        let p = self.get("/login").await;
        let csrf = field(&p.body, "csrf");
        self.post(
            "/login",
            &[("csrf", &csrf), ("user", user), ("password", pw)],
        )
        .await
    }
}
