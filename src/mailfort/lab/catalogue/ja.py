"""日本語: 各攻撃の内容、対策、mailfort のどこで行われるか(支援士シラバスの用語)。"""

ATTACKS: dict[str, dict[str, str]] = {
    "one-door": {
        "title": "メールの投稿と中継が同じ仕組み(25番ポート)",
        "summary": "アカウントを持たないクライアントが25番ポートでローカルユーザーとして投稿する",
        "attack": "第三者が旧来型サーバの唯一の入口である25番ポートに接続し、アカウントなしで "
                  "alice@example.test を名乗って remote.example の取引先にメールを投稿する。"
                  "堅牢化サーバでは25番ポートと投稿用ポート(サブミッションポート)の両方を試す。",
        "counter": "mailfort は入口を分ける。MX(25番)は自ドメイン宛てのメールだけを受け取り "
                   "SMTP-AUTH を提示しない。サブミッションポート 587(STARTTLS の後に SMTP-AUTH)と "
                   "465(最初から TLS)では SMTP-AUTH の前の MAIL を 530 5.7.0 で拒否し、"
                   "外部ドメイン "
                   "への送信はそこでしか行えない。場所: server/smtp.py の ServiceOptions、"
                   "server/app.py のリスナー、protocol/smtp.py の auth_required。",
    },
    "open-relay": {
        "title": "第三者中継(オープンリレー)",
        "summary": "第三者のスパムが外部ドメイン宛てに中継され、被害者のサーバに届く",
        "attack": "サーバと無関係のスパマーが spam-engine.example から victim@remote.example "
                  "宛てのメールをこのサーバ経由で送る。",
        "counter": "宛先は RCPT の時点で、RFC 5321 どおりに解析したアドレスで判定する。"
                   "SMTP-AUTH で認証していない(信頼ネットワークでもない)クライアントからの外部 "
                   "ドメイン宛ては 554 5.7.1 で拒否し、%、!、引用符内の @、ソースルート、IP "
                   "リテラルは経路として扱わない。オープンリレーになる設定(0.0.0.0/0)は起動時に拒否"
                   "する。場所: policy/relay.py(decide_recipient)、protocol/address.py、"
                   "config.py。",
    },
    "spoofing": {
        "title": "送信元メールアドレスの詐称",
        "summary": "ローカルユーザーを詐称した MAIL FROM/From: が本物として配送される",
        "attack": "アカウントを持つ mallory が ceo@example.test を名乗り(MAIL FROM と From:)、"
                  "bob に至急の送金指示を送る。"
                  "続いて外部の第三者が同じ詐称メールを MX に直接送る。",
        "counter": "認証済みユーザーは自分のアドレスと自分に届くエイリアスでしか送信できない"
                   "(MAIL FROM と From: ヘッダの両方、違反は 553 5.7.1)。場所: policy/senders.py、"
                   "policy/msa.py(サブミッションで適用)。外部から MX に届く自ドメイン詐称には "
                   "SPF と DMARC を検査する: example.test は 'v=spf1 -all' と 'p=reject' を公開して"
                   "おり、詐称メールはどちらにも合格せず、DATA の終わりに 550 5.7.1 で拒否される。"
                   "場所: policy/spf.py、policy/dmarc.py、server/senderauth.py。",
    },
    "backscatter": {
        "title": "NDRスパム(バックスキャッター)",
        "summary": "送信元を詐称して存在しないユーザーに送ると、NDRメールがスパムを添付して"
                   "詐称されたアドレスに届く",
        "attack": "スパマーが送信元を被害者のアドレス victim@innocent.example に詐称し、"
                  "存在しないユーザー宛てにスパムを送る。",
        "counter": "存在しないローカルユーザーは RCPT の時点で 550 5.1.1 で拒否するので、"
                   "後から配送不能通知(NDR)を送る必要のあるメールを受け取らない。キューが NDR を"
                   "送るのは認証済みローカルユーザーが投稿したメールだけで、宛先はそのユーザー本人、"
                   "空の送信者には送らない。場所: policy/relay.py(decide_recipient)、"
                   "queue/worker.py の may_bounce。",
    },
    "vacation-backscatter": {
        "title": "不在通知によるバックスキャッター",
        "summary": "送信元を詐称して不在中のユーザーに送ると、自動応答が詐称されたアドレスに届く",
        "attack": "carol は不在中(Sieve の vacation スクリプト)。スパマーが送信元を被害者の"
                  "アドレス victim@innocent.example に詐称して carol に送る。innocent.example は "
                  "'v=spf1 -all' を公開しており、送信元の詐称は明らか。",
        "counter": "不在通知は認証された送信者にだけ返す: サブミッションでログインしたローカル"
                   "ユーザー、または外部からは封筒の送信者ドメインの SPF pass か DKIM pass。"
                   "空の送信者、MAILER-DAEMON、owner-、-request、メーリングリストや自動送信の"
                   "メール、ユーザー宛てでないメールには返さず、同じ送信者には期間内に一度だけ。"
                   "場所: policy/vacation.py、server/sieve_delivery.py。",
    },
    "sniff": {
        "title": "平文通信(パスワードとメールの盗聴)",
        "summary": "alice のパスワード(AUTH PLAIN、POP3 PASS、IMAP LOGIN)とメール本文を"
                   "通信の記録から読む",
        "attack": "alice がいつもどおり機密のメールを送り、POP3 と IMAP でメールボックスを読む。"
                  "メールソフトはサーバが提示する機能(CAPABILITY)に従ってログインする。"
                  "記録プロキシは、経路上の誰か(共有ネットワーク、盗聴)が読める内容を示す。",
        "counter": "SMTP-AUTH は TLS の中でだけ提示し(TLS 前は 538 5.7.11)、POP3 の USER/PASS は "
                   "STLS の前は拒否する。IMAP は STARTTLS の前に LOGINDISABLED を示して AUTH= を"
                   "提示せず、LOGIN と AUTHENTICATE を NO [PRIVACYREQUIRED] で拒否するので、"
                   "クライアントはパスワードを平文で送らない。25・587・110・143 で STARTTLS/STLS、"
                   "465・995・993 で最初から TLS、TLS 1.2 以上のみ、ハンドシェイク前に送り込まれた"
                   "平文は破棄する。場所: protocol/smtp.py(auth_requires_tls)、protocol/pop3.py、"
                   "protocol/imap.py(allow_plaintext)、tls.py。",
    },
    "vrfy": {
        "title": "VRFY/EXPN によるアカウント情報の漏洩",
        "summary": "VRFY/EXPN でユーザー一覧とエイリアスの実際の配送先が分かる",
        "attack": "攻撃者がよくある12の名前を VRFY で、2つのエイリアスを EXPN で問い合わせる。",
        "counter": "VRFY はどの引数にも 252、EXPN は 502 を返すので、応答からアカウントの有無は"
                   "分からない。バナーにソフトウェア名を出さず、SMTP-AUTH の失敗は実在・非実在で"
                   "同じ応答になる(RCPT は存在しないユーザーを拒否し続ける必要がある。それが "
                   "NDRスパムを"
                   "防ぐため。エラー数の上限で試行を制限する)。場所: protocol/smtp.py の "
                   "_cmd_vrfy と _cmd_expn。",
    },
    "smuggling": {
        "title": "SMTP スマグリング",
        "summary": "<LF>.<LF> を使い、送信元を詐称した2通目のメールを紛れ込ませる",
        "attack": "攻撃者は1通のメールの中で、行を単独の LF・ドット・単独の LF で終え、続けて "
                  "ceo@example.test からの完全な2つ目のトランザクションを書く。",
        "counter": "DATA を終えるのは <CRLF>.<CRLF> だけで、単独の CR や LF を含むメールは終了後に"
                   "拒否する(550 5.6.0)。こうしてメッセージの終わりについて2台のサーバの解釈が"
                   "食い違うことはない。場所: protocol/smtp.py の _step_data、protocol/body.py。",
    },
    "overflow": {
        "title": "バッファオーバーフロー(BOF)とリソース枯渇",
        "summary": "20,000オクテットのコマンド行と2,000件の RCPT: 旧来型は保持、堅牢化は拒否",
        "attack": "攻撃者は20,000オクテットのコマンド行(古い MTA は行を固定長バッファにコピー"
                  "していた: バッファオーバーフロー)を送り、続けて1つのトランザクションに2,000件の"
                  "宛先を送る。",
        "counter": "ネットワークから読むすべてに上限があり、それぞれ明確な応答を返す: コマンド行 "
                   "512オクテット(500 5.5.2)、テキスト行1000、SIZE、宛先100件(452 4.5.3)、"
                   "エラー10回(421 4.7.0)、無通信・セッション時間、接続数。本文はディスクに"
                   "ストリームし、パーサはファジングで検査する。場所: protocol/lines.py、"
                   "protocol/errors.py、protocol/body.py、config.py の [limits]。",
    },
    "guessing": {
        "title": "パスワードの推測(総当たり)",
        "summary": "SMTP-AUTH と POP3 でパスワードを試す: 旧来型は無制限、堅牢化は遅延の後に遮断",
        "attack": "攻撃者は自分のアドレスから bob@example.test のよくあるパスワード9個を、"
                  "5個を SMTP-AUTH で、残りを POP3 で試す。",
        "counter": "SMTP-AUTH と POP3 に共通の認証器が、クライアントごととアカウントごとに失敗を"
                   "数える。遅延が増え、やがてクライアントを遮断する(その後は正しいパスワードも"
                   "拒否)。アカウントは遅くするだけでロックしないので、持ち主を締め出すことは"
                   "できない(ラボでは数秒で終わるよう遅延を短くしている)。場所: policy/authn.py、"
                   "policy/counters.py、config.py の [auth]。",
    },
}

NOTES: dict[str, str] = {
    "auth.offered-on-25": "25番ポートが平文で SMTP-AUTH を提示: 利用者もサーバも同じ入口",
    "auth.not-on-25": "25番ポートは SMTP-AUTH を提示しない: 他のサーバ専用の入口",
    "sink.arrived": "被害者のサーバ: 第三者が alice の名前で送ったメールが {n} 通届いた",
    "sink.relayed": "被害者のサーバ: スパムが {host} に第三者中継されて届いた"
                    "(Received ヘッダ {received} 行)",
    "sink.empty": "被害者のサーバ: 何も届いていない",
    "mailbox.forged": "{user} のメールボックス: ceo@example.test を詐称した指示が本物として"
                      "保存された",
    "mailbox.clean": "{user} のメールボックス: 詐称メールはない",
    "forged.bounce": "詐称された送信元のメールボックス: {to} 宛ての NDR メールが届いた"
                     "(スパムを添付: {spam})",
    "forged.nothing": "詐称された送信元のメールボックス: {to} には何も届いていない",
    "forged.autoreply": "詐称された送信元のメールボックス: {to} 宛ての自動応答が届いた",
    "wire.password": "通信の記録: パスワードを取得: {password}({via} から)",
    "wire.via": "{how}",
    "wire.no-password": "通信の記録: パスワードは取得できない",
    "wire.message": "通信の記録: 機密のメール本文が読める",
    "wire.no-message": "通信の記録: メール本文は読めない",
    "imap.login-in-clear": "IMAP: LOGIN を平文で受け付けた(AUTH=PLAIN を提示、"
                           "LOGINDISABLED なし、STARTTLS なし)",
    "imap.login-refused": "IMAP: STARTTLS の前は LOGINDISABLED、LOGIN は NO [PRIVACYREQUIRED] "
                          "で拒否。パスワードは TLS の中で送られた",
    "wire.octets": "通信の記録: 平文 {clear} オクテット、TLS レコード {tls} オクテット",
    "vrfy.users": "存在を確認できたアカウント: {tried} 個中 {n} 個({users})",
    "vrfy.nothing": "存在を確認できたアカウント: {tried} 個中なし",
    "expn.alias": "EXPN {alias}: {targets}",
    "mailbox.smuggled": "{user} のメールボックス: 紛れ込ませた CEO 名義のメールが保存された"
                        "(応答: {replies})",
    "mailbox.not-smuggled": "{user} のメールボックス: 紛れ込んだメールはない(応答: {replies})",
    "overflow.line-accepted": "{octets} オクテットのコマンド行を読み込み {code} で応答した",
    "overflow.line-refused": "{octets} オクテットのコマンド行を 512 オクテットの時点で拒否した"
                             "({code})",
    "overflow.rcpt": "宛先 {sent} 件中 {accepted} 件を受理。送信終了時にサーバがメモリに保持"
                     "していた宛先は {held} 件(約 {kib} KiB)",
    "overflow.closed": "エラーが多すぎるためセッションを切断した(421)",
    "guess.tries": "{n} 個のパスワードを {seconds} 秒で試行(最も遅い応答 {slowest} 秒)",
    "guess.found": "{user} のパスワードが判明: {password}({via} で)",
    "guess.refused": "{user} のパスワードは判明せず、推測者は遮断された",
}

UI: dict[str, str] = {
    "yes": "はい",
    "no": "いいえ",
    "list_sep": "、",
    "title": "mailfort ラボ: 各脆弱性を旧来型サーバと mailfort で比べる",
    "intro": "127.0.0.1 上の2台の mailfort(同じドメインとユーザー): 保護を外した旧来型"
             "プロファイルと、標準の堅牢化構成。このマシンの外には何も出ない。",
    "legacy": "旧来型プロファイル",
    "hardened": "堅牢化した mailfort",
    "attack": "攻撃",
    "attacker": "攻撃者が行うこと",
    "replies": "各サーバの応答",
    "consequence": "観測点で分かること",
    "wire": "盗聴者が読めるもの",
    "counter": "対策",
    "summary": "まとめ",
    "succeeded": "攻撃成功",
    "stopped": "阻止",
    "row": "行",
    "list": "攻撃の一覧(mailfort lab --attack 名前):",
    "starting": "ラボを起動しています(旧来型・堅牢化サーバ、観測点)…",
    "stopped_lab": "ラボを停止し、一時データを削除しました。",
}
