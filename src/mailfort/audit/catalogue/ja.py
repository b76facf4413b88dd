"""日本語: 各脆弱性がなぜ問題か、どう対策するか。"""

CHECKS: dict[str, dict[str, str]] = {
    "relay.open": {
        "title": "第三者中継(オープンリレー)",
        "why": "誰からでも誰宛てでも受け付けるサーバは、第三者中継によってスパマーの踏み台になり、"
               "RBL.jp などのブラックリストに登録されて自組織のメールまで受信拒否される。"
               "古い中継テストは %ハック、引用符付きローカル部、ソースルート、バングパス、"
               "IP アドレスリテラルで宛先を隠し、自ドメインの送信者なら中継するサーバには"
               "自ドメインの送信元アドレスを詐称する。監査は RCPT で止めて何も送らないため、"
               "見えるのは受理であって中継そのものではない。しかし外部宛てを RCPT で受理し "
               "DATA の終わりでだけ拒否するサーバは、内容判定ひとつで中継に転じる。また DATA の"
               "応答は全宛先に一つなので、自ドメイン宛てと外部宛てを含むメールは丸ごと拒否"
               "するか中継するかしかない。",
        "fix": "認証していないクライアントからは自ドメイン宛てのメールだけを受け付け、宛先は "
               "RFC 5321 どおりに解析してから判定する。%、!、引用符内の @、ソースルートを"
               "中継指示として扱わない。",
        "postfix": "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, "
                   "reject_unauth_destination を維持し、mynetworks は自ホストのみ、"
                   "allow_percent_hack = no、swap_bangpath = no とする。",
    },
    "backscatter.unknown-user": {
        "title": "NDRスパム(バックスキャッタ): 存在しないユーザー宛てを受理",
        "why": "存在しないユーザー宛てのメールを受け付けてから配送不能通知(NDR)を返すサーバは、"
               "送信元を詐称したスパムを無関係の第三者へ NDRスパムとして送りつける踏み台になる。"
               "DATA の終わりで拒否すればそのメールの NDR は出ないが、DATA の応答は全宛先に"
               "一つなので、既知と存在しないユーザーの両方宛てのメールは受理して存在しない方に"
               "NDR を返すか、両方とも拒否するしかない。",
        "fix": "RCPT の時点で宛先を確認し、存在しないユーザーは 550 5.1.1 で拒否する。"
               "受け付けた後で返送する必要のあるメールを作らない。",
        "postfix": "smtpd_reject_unlisted_recipient = yes とし、local_recipient_maps または "
                   "virtual mailbox maps を完全にする。中継ドメインには relay_recipient_maps。",
    },
    "submission.no-auth": {
        "title": "認証なしのメール投稿",
        "why": "587/465 番ポートは SMTP-AUTH で利用者を認証してから投稿を受け付けるための"
               "入口である。AUTH なしで MAIL を受け付けると、投稿と中継を 25 番で区別しなかった"
               "旧来の構成と同じになる。",
        "fix": "587/465 では AUTH 前の MAIL に 530 5.7.0 を返し、中継は認証済みユーザーにだけ"
               "許す。",
        "postfix": "master.cf の submission/submissions で -o smtpd_sasl_auth_enable=yes "
                   "-o smtpd_client_restrictions=permit_sasl_authenticated,reject。",
    },
    "submission.auth-before-tls": {
        "title": "TLS 前の SMTP-AUTH",
        "why": "AUTH PLAIN/LOGIN のパスワードは base64 にすぎず平文と同じである。STARTTLS 前に "
               "SMTP-AUTH を受け付けると、パケット盗聴でパスワードが漏洩する。",
        "fix": "AUTH は TLS の中でだけ提示・受理し(TLS 前は 538 5.7.11)、投稿ポートに限る。",
        "postfix": "smtpd_tls_auth_only = yes、submission では smtpd_tls_security_level = "
                   "encrypt、25 番では SASL を無効にする。",
    },
    "submission.sender-forgery": {
        "title": "認証済みユーザーによる送信者詐称",
        "why": "どの MAIL FROM や From: でも使えるアカウントは、パスワードが一つ盗まれただけで"
               "誰にでもなりすましてメールを送れる。",
        "fix": "認証済みユーザーには自分のアドレスとエイリアスだけを MAIL FROM と From: に許す"
               "(それ以外は 553 5.7.1)。",
        "postfix": "submission で smtpd_sender_login_maps と reject_sender_login_mismatch、"
                   "From: はヘッダチェックかミルターで検査する。",
    },
    "disclosure.banner": {
        "title": "ソフトウェア名・バージョンの開示",
        "why": "バナーに MTA の種類とバージョンがあると、攻撃者はそのバージョンの既知の脆弱性"
               "(BOF 攻撃など)を狙える。",
        "fix": "グリーティング、EHLO、HELP、CAPA、CAPABILITY、エラー応答、IMAP の ID に"
               "ソフトウェア名もバージョンも含めない(ID には NIL を返す)。",
        "postfix": "smtpd_banner = $myhostname ESMTP($mail_name や $mail_version を外す)。",
    },
    "disclosure.vrfy-expn": {
        "title": "VRFY/EXPN によるアカウント情報の漏洩",
        "why": "VRFY/EXPN がアカウントの有無やエイリアスの実際の配送先を答えると、攻撃者は"
               "パスワード推測やスパムの標的になるアカウントを列挙できる。",
        "fix": "VRFY はどのアドレスにも 252、EXPN は 502 で応答する(RCPT で存在しないユーザーを"
               "拒否するのは正しい動作であり、指摘ではない)。",
        "postfix": "disable_vrfy_command = yes。",
    },
    "tls.starttls": {
        "title": "全 SMTP・IMAP・ManageSieve ポートでの STARTTLS",
        "why": "SMTP にはメールを暗号化する機能がなく、TLS がなければメールもパスワードも平文で"
               "ネットワークを流れ、盗聴・改竄される。",
        "fix": "25/587/143/4190 で STARTTLS、465/993 で暗黙の TLS を提供し、正しい証明書を使う。",
        "postfix": "smtpd_tls_cert_file、smtpd_tls_key_file、smtpd_tls_security_level = may(25)"
                   " / encrypt(587)。",
    },
    "tls.pop3-stls": {
        "title": "POP3 の STLS",
        "why": "POP3 はパスワードとメール本文を運ぶ。TLS がなければどちらも平文で盗聴される。",
        "fix": "110 で STLS、995 で暗黙の TLS を提供する。",
        "postfix": "Postfix は POP3 を提供しない。POP3 サーバ側で ssl = required とする。",
    },
    "pop3.plaintext-auth": {
        "title": "TLS 前の POP3 USER/PASS",
        "why": "STLS 前に USER/PASS を受け付ける POP3 サーバでは、メールクライアントが"
               "パスワードを平文で送ってしまう。",
        "fix": "STLS 前の USER、PASS、AUTH を拒否し、CAPA にも載せない。",
        "postfix": "Postfix は POP3 を提供しない。POP3 サーバで TLS なしの平文認証を無効にする。",
    },
    "pop3.apop": {
        "title": "POP3 の APOP",
        "why": "APOP は MD5 を用いたチャレンジレスポンス方式の認証で、パスワードそのものは"
               "送らないが、2007 年に MD5 の衝突を利用した実用的な攻撃が示され、チャレンジを"
               "選べる中間者(サーバになりすます者)はクライアントの応答からパスワードを"
               "割り出せる。盗聴した一回分の応答からオフラインで推測することもできる。さらにサーバは"
               "ダイジェストを照合するため全パスワードを平文で保存しなければならない。",
        "fix": "APOP を提供しない(挨拶にタイムスタンプを含めない)。認証は TLS の中"
               "(STLS または 995 番ポート)で USER/PASS か SASL PLAIN だけにする。",
        "postfix": "Postfix は POP3 を提供しない。POP3 サーバ側で APOP を無効にする"
                   "(Dovecot なら auth_mechanisms から apop を外す)。",
    },
    "tls.versions": {
        "title": "TLS 1.2 未満のバージョン",
        "why": "TLS 1.0/1.1 は廃止されており(RFC 8996)、ダウングレードで通信全体が弱くなる。",
        "fix": "TLS 1.2 と 1.3 だけを受け付ける。",
        "postfix": "smtpd_tls_protocols = >=TLSv1.2、smtpd_tls_mandatory_protocols = "
                   ">=TLSv1.2。",
    },
    "tls.ciphers": {
        "title": "弱い暗号スイート",
        "why": "NULL 暗号は暗号化せず、匿名暗号はサーバを認証せず、EXPORT・RC4・3DES は"
               "破られている。",
        "fix": "前方秘匿性のある AEAD 暗号だけを提供する。",
        "postfix": "smtpd_tls_ciphers = high、smtpd_tls_exclude_ciphers = aNULL, eNULL, "
                   "EXPORT, RC4, 3DES, MD5。",
    },
    "tls.certificate": {
        "title": "証明書の有効性",
        "why": "期限切れや検証できない証明書は、利用者に警告を無視する習慣をつけ、中間者が"
               "自分の証明書を差し出す余地を与える。",
        "fix": "サーバ名に対して信頼された CA の証明書を使い、期限前に更新する"
               "(テスト用ホストの自己署名は問題ない)。",
        "postfix": "smtpd_tls_chain_files に中間証明書まで含め、自動更新する。",
    },
    "tls.injection-smtp": {
        "title": "STARTTLS コマンドインジェクション(SMTP)",
        "why": "STARTTLS と一緒に平文で送られたコマンドがハンドシェイク後に実行されると"
               "(CVE-2011-0411 の類)、中間者が暗号化されたセッションにコマンドを注入できる。",
        "fix": "STARTTLS に応答する時点で受信済みのデータをすべて捨てる。",
        "postfix": "Postfix 2.8.0 / 2.7.3 以降で修正済み。更新する。",
    },
    "tls.injection-pop3": {
        "title": "STLS コマンドインジェクション(POP3)",
        "why": "SMTP と同じく、STLS と一緒に送られた平文コマンドが TLS の中で実行される。",
        "fix": "STLS に応答する時点で受信済みのデータをすべて捨てる。",
        "postfix": "Postfix は POP3 を提供しない。POP3 サーバを更新する。",
    },
    "imap.plaintext-auth": {
        "title": "TLS 前の IMAP LOGIN",
        "why": "STARTTLS 前に LOGIN や AUTH= を受け付ける、または AUTHENTICATE に + で応じる "
               "IMAP サーバでは、メールクライアントがパスワードを平文で送ってしまい、パケット"
               "盗聴で漏洩する。",
        "fix": "143 番では STARTTLS 前に LOGINDISABLED を提示して AUTH= を載せず、LOGIN と "
               "AUTHENTICATE には(+ を返す前に)NO [PRIVACYREQUIRED] か BAD を返す。993 番の"
               "暗黙の TLS を勧める。",
        "postfix": "Postfix は IMAP を提供しない。IMAP サーバで TLS なしの平文認証を無効にする"
                   "(Dovecot では disable_plaintext_auth = yes / auth_allow_cleartext = no)。",
    },
    "tls.injection-imap": {
        "title": "STARTTLS コマンドインジェクション(IMAP)",
        "why": "SMTP と同じく、STARTTLS と一緒に送られた平文コマンドが TLS の中で実行される"
               "(CVE-2011-0411 の類で、複数の IMAP サーバで見つかった)。",
        "fix": "STARTTLS に応答する時点で受信済みのデータをすべて捨てる。",
        "postfix": "Postfix は IMAP を提供しない。IMAP サーバを更新する。",
    },
    "managesieve.plaintext-auth": {
        "title": "TLS 前の ManageSieve AUTHENTICATE",
        "why": "STARTTLS 前に SASL の方式を提示する、または AUTHENTICATE にチャレンジで応じる "
               "ManageSieve サーバ(4190 番、RFC 5804)では、メールクライアントの Sieve 編集機能"
               "がメールボックスのパスワードを平文で送ってしまう。",
        "fix": "STARTTLS 前は空の SASL と STARTTLS を提示し、AUTHENTICATE にはチャレンジを返す"
               "前に NO (ENCRYPT-NEEDED) を返す。",
        "postfix": "Postfix は ManageSieve を提供しない。Sieve サーバで TLS なしの平文認証を無効"
                   "にする(Dovecot の Pigeonhole なら disable_plaintext_auth = yes / "
                   "auth_allow_cleartext = no)。",
    },
    "tls.injection-managesieve": {
        "title": "STARTTLS コマンドインジェクション(ManageSieve)",
        "why": "SMTP と同じく、STARTTLS と一緒に送られた平文コマンドが TLS の中で実行され、"
               "次にログインした利用者の権限で動く(PUTSCRIPT で全メールの転送を仕込める)。",
        "fix": "STARTTLS に応答する時点で受信済みのデータをすべて捨てる。",
        "postfix": "Postfix は ManageSieve を提供しない。ManageSieve サーバを更新する。",
    },
    "limits.imap-literal": {
        "title": "IMAP のリテラルの上限(BOF)",
        "why": "IMAP のリテラルはバイト列の前に大きさ({4294967295})を宣言する。どんな大きさにも "
               "+ で応じたり、その値でバッファを確保したりするサーバは、数 GB を抱え込まされるか "
               "BOF 攻撃を受ける。",
        "fix": "上限を超えるリテラルは 1 バイトも読まずにタグ付きの NO か BAD で拒否し(+ を"
               "返さない)、その後もサービスを続けるか BYE で切断する。",
        "postfix": "Postfix は IMAP を提供しない。IMAP サーバのリテラルの上限を既定値のまま保つ"
                   "(Dovecot では imap_max_line_length もこれを制限する)。",
    },
    "limits.imap-line": {
        "title": "IMAP のコマンド行の上限(BOF)",
        "why": "どんなに長いコマンド行でも抱え込むサーバは、受け付けるセッションごとに数 MB を"
               "使わされ、固定長のバッファなら BOF 攻撃を受ける。IMAP ではその行への応答が、行を"
               "丸ごと保持した証拠になる: タグ付き応答はタグを返し、コマンドは行の末尾にあった。",
        "fix": "コマンド行を制限し(RFC 9051 §4 はクライアントに 8192 オクテット以内を求める)、"
               "超えたら BAD を返すか、BYE を送って切断する。",
        "postfix": "Postfix は IMAP を提供しない。IMAP サーバの行の上限(Dovecot では "
                   "imap_max_line_length、64 KiB)を既定値のまま保つ。",
    },
    "smuggling.end-of-data": {
        "title": "SMTP スマグリング",
        "why": "裸の LF や CR を含む <CRLF>.<CRLF> もどきをデータの終わりとみなすサーバでは、"
               "攻撃者が一通目の中に送信者を詐称した二通目を隠し、中継サーバの SPF/DMARC を"
               "通過させられる。",
        "fix": "DATA は <CRLF>.<CRLF> だけで終え、裸の CR/LF を含むメールは拒否する。",
        "postfix": "smtpd_forbid_bare_newline = normalize(3.9)または yes、"
                   "smtpd_data_restrictions = reject_unauth_pipelining。",
    },
    "content.gtube": {
        "title": "コンテンツフィルタがない(GTUBE を受理)",
        "why": "世界のメールの大半は迷惑メールであり、エンベロープと DNS で証明できないもの"
               "(中継、ブロックリスト、SPF/DKIM/DMARC)はコンテンツフィルタにしか判断できない。"
               "GTUBE はどの迷惑メールフィルタも確実な迷惑メールとみなすテスト用の一行で、"
               "これを受理するサーバはエンベロープの検査をすり抜けた迷惑メールも受理する。"
               "拒否は DATA の終わりにセッションの中で行う必要がある: 受理してから NDR を返す"
               "フィルタは NDRスパム(バックスキャッタ)を送る。監査は GTUBE 入りのメールを"
               "空の送信者で既知のローカルユーザーにだけ送り、拒否されたときは GTUBE を除いた"
               "同じメールを対照として送る。",
        "fix": "コンテンツフィルタを milter として接続し、DATA の終わりに判定させる。mailfort と "
               "rspamd(Debian の既定どおり milter モードの proxy ワーカー)なら設定に二行: "
               "[[milter]] と address = \"inet:127.0.0.1:11332\"(README の \"Content "
               "filtering\" を参照)。ここで 4xx が返るのは、たいていフィルタに接続できない"
               "ため: 応答が戻るまですべてのメールが待たされる。",
        "postfix": "smtpd_milters = inet:127.0.0.1:11332(milter モードの rspamd proxy "
                   "ワーカー)、non_smtpd_milters = $smtpd_milters、milter_default_action = "
                   "tempfail。",
    },
    "limits.long-line": {
        "title": "長すぎるコマンド行(BOF)",
        "why": "旧バージョンの MTA はコマンド行を固定長バッファにコピーしており、長い行は BOF "
               "攻撃になった。上限のない行は今でもメモリを使い果たさせる。",
        "fix": "コマンド行を制限し(RFC 5321: 512 オクテット)、超えたら 500 5.5.2 を返す。",
        "postfix": "line_length_limit(既定 2048)で制限される。既定値を保つ。",
    },
    "limits.size": {
        "title": "メッセージサイズの上限",
        "why": "サイズ上限のないサーバは一つのクライアントにディスクを埋め尽くされる。",
        "fix": "SIZE を提示し、それを超える SIZE 宣言は MAIL で(552 5.3.4)、超える本文は DATA の"
               "終わりで拒否する。",
        "postfix": "message_size_limit = 26214400(必要な大きさ)。",
    },
    "limits.recipients": {
        "title": "1 通あたりの宛先数",
        "why": "宛先数に上限がないと、1 通が大量のスパム送信になり、メモリも使い果たす。",
        "fix": "上限(例えば 100)を超えた RCPT に 452 4.5.3 を返す。",
        "postfix": "smtpd_recipient_limit = 100(以下)。",
    },
    "limits.nul": {
        "title": "コマンド中の NUL バイト",
        "why": "NUL バイトは C の文字列を途中で切り、ログやフィルタを混乱させる(パーサの不具合の"
               "古典的な入口)。",
        "fix": "NUL を含むコマンド行を拒否する。",
        "postfix": "Postfix は拒否する。最新に保つ。",
    },
    "limits.idle-connections": {
        "title": "接続の枯渇",
        "why": "少数の無言または極端に遅いクライアントが、サーバの全セッションを占有してはならない"
               "(slowloris)。",
        "fix": "全体と IP ごとの接続数を制限し、無言・低速のセッションをタイムアウトさせる。",
        "postfix": "smtpd_client_connection_count_limit、smtpd_timeout、anvil_rate_time_unit。",
    },
    "limits.liveness": {
        "title": "監査後もサービスを継続",
        "why": "どんな不正な入力にも応答し、次のクライアントに引き続きサービスしなければならない。",
        "fix": "各上限は応答して切断するだけにし、クラッシュや停止をしない。",
        "postfix": "メールログでパニックやプロセスの再起動を確認する。",
    },
    "dns.mx": {
        "title": "MX レコード",
        "why": "送信側は MX でドメインのメールサーバを見つける。無ければ推測に頼る。",
        "fix": "このサーバの名前を指す MX レコードを公開する。",
        "postfix": "(Postfix ではなく DNS の設定。)",
    },
    "dns.spf": {
        "title": "SPF レコード",
        "why": "SPF により受信側はドメインを詐称した外部サーバからのメールを拒否できる。"
               "無い場合や +all では誰でも送れる。",
        "fix": "'v=spf1 mx -all' のような TXT レコードを一つだけ公開する。",
        "postfix": "(Postfix ではなく DNS の設定。)",
    },
    "dns.dmarc": {
        "title": "DMARC レコード",
        "why": "DMARC は From: のドメインで SPF と DKIM に失敗したメールの扱いを受信側に伝える。",
        "fix": "_dmarc.ドメイン に TXT 'v=DMARC1; p=quarantine' または p=reject を公開する。",
        "postfix": "(Postfix ではなく DNS の設定。)",
    },
    "dns.dnsbl": {
        "title": "DNSBL(RBL)への登録",
        "why": "ブラックリスト(RBL.jp などの RBL)に登録されたサーバのメールは、そのリストを使う"
               "すべての受信側で拒否される。多くはオープンリレーやスパム送信が原因である。",
        "fix": "原因(オープンリレー、NDRスパム、乗っ取られたアカウント)を取り除いてから、"
               "リストに削除を依頼する。",
        "postfix": "メールログで中継されたメールや乗っ取られた SASL アカウントを確認する。",
    },
}

NOTES: dict[str, str] = {
    "port.closed": "ポート {port}({service})は閉じている",
    "port.none": "{service} のポートが指定されていない",
    "tls.none-offered": "{services} は TLS を提供していない: 試験対象なし(tls.starttls を参照)",
    "port.none-of": "どれも開いていない: {services}",
    "tls.not-offered": "{service} は TLS を提供していない",
    "need.domain": "このチェックには --domain が必要",
    "need.user": "このチェックには --domain と --user(既知のローカルユーザー)が必要",
    "need.auth": "このチェックには --auth-user と --auth-password-file が必要",
    "probe.drops": "サーバがセッションを {n} 回切断した",
    "probe.error": "プローブが失敗した: {error}",
    "internal.error": "監査ツール内部でチェックが失敗した: {error}",
    "greeting.refused": "{service} の挨拶が {code} ({text}): サーバはすべてのセッションを"
                        "拒否している (RFC 5321 3.1 節) ため、これは検査できない",
    "tls.no-handshake": "{service} は TLS を提示するが、ハンドシェイクが一度も完了しない "
                        "({error}): そこでは何も検査できない (tls.starttls を参照)",
    "apop.offered": "APOP が提示されている: {where}",
    "apop.none": "{services} の挨拶に APOP のタイムスタンプはない",
    "budget.spent": "このチェックの前に実行時間の上限に達した",
    "budget.cut": "このチェックの途中で実行時間の上限 (--budget {budget} 秒) に達した",
    "replies.uncounted": "{what} の後に送った QUIT への応答が --timeout 内になかった ({error}): "
                         "応答の数を数えられない",
    "probe.no-reply": "{what} への完全な応答が --timeout 内になかった ({error}): サーバーは"
                      "まだそれを処理するかもしれない",
    "control.none": "対照がないため拒否を信頼できない: --domain と --user を指定する"
                    "({tried} 件の試行が拒否された)",
    "control.known-refused": "対照の失敗: 既知のユーザー {address} が受け付けられないため、"
                             "拒否は何も意味しない",
    "control.own-refused": "対照の失敗: {user} が自分自身として送信できない",
    "relay.accepted": "第三者中継の試行 {tried} 件中 {n} 件が RCPT で受理された(送信元 "
                      "{senders})。最初: {first}。メールは送っていないため中継そのものは"
                      "確認していない",
    "relay.ambiguous": "自ドメイン形式の中継 {n} 件が受理されたが、サーバはどのローカル宛先も"
                       "受理する(NDRスパムを参照)。最初: {first}",
    "relay.refused": "{tried} 通りの第三者中継(送信元 {senders} 種)をすべて拒否し、既知の"
                     "ユーザーは受理した"
                     "(再接続 {reconnects} 回)",
    "backscatter.accepted": "{domain} の存在しないユーザーが RCPT で受理され、その宛先への"
                            "メールも DATA の終わりで受理された ({code})。NDR を返すか"
                            "黙って捨てるしかない",
    "backscatter.data-refused": "{domain} の存在しないユーザーが RCPT で受理された。その宛先"
                                "へのメールは DATA の終わりで拒否された ({code}) ため NDR は"
                                "確認していないが、既知のユーザーも宛先に含むメールでは存在"
                                "しない方だけを拒否できない",
    "backscatter.rcpt-only": "{domain} の存在しないユーザーが RCPT で受理された(メールの"
                             "試行は DATA を越えられなかった: {code})",
    "backscatter.refused": "存在しないユーザーは RCPT で拒否され、既知のユーザーは受理された",
    "submission.relayed": "{services} で AUTH なしに MAIL と外部宛て RCPT が受理された",
    "submission.mail-accepted": "{services} で AUTH なしに MAIL が受理された(外部宛て RCPT は"
                                "拒否)",
    "submission.mail-refused": "AUTH 前の MAIL は拒否された",
    "auth.cleartext": "TLS 前の SMTP-AUTH: {where}",
    "auth.refused": "TLS 前には SMTP-AUTH を提示も受理もしない",
    "auth.failed": "{user} の認証情報が受け付けられなかった",
    "forgery.accepted": "認証済みユーザーが他人として送信できる: {what}",
    "forgery.null-sender": "認証済みユーザーが空の送信者 <> を使える",
    "forgery.refused": "外部の MAIL FROM、空の送信者、詐称した From: はすべて拒否された",
    "banner.version": "ソフトウェアのバージョンを開示: {where}",
    "banner.name": "ソフトウェア名を開示: {where}",
    "banner.clean": "バナー、EHLO、HELP、エラー、IMAP の ID にソフトウェア名もバージョンもない",
    "vrfy.leaks": "VRFY/EXPN でユーザーの有無が区別できる(既知/不明): {what}; {rcpt}(想定どおり)",
    "vrfy.same": "VRFY/EXPN でユーザーの有無は区別できない: {what}; {rcpt}(想定どおり)",
    "imap.cleartext": "パスワードを平文で送れる: {what}",
    "imap.refused": "STARTTLS 前は LOGINDISABLED を提示し、AUTH= はなく、LOGIN と "
                    "AUTHENTICATE を拒否する",
    "imap.why.no-logindisabled": "STARTTLS 前に LOGINDISABLED がない",
    "imap.why.auth": "STARTTLS 前に {mechs} を提示",
    "imap.why.login-ok": "STARTTLS 前の LOGIN が受理された",
    "imap.why.login-checked": "STARTTLS 前の LOGIN が照合された(AUTHENTICATIONFAILED): "
                              "パスワードを平文で受け取った",
    "imap.why.authenticate": "STARTTLS 前の AUTHENTICATE PLAIN に + で応じた(認証情報を平文で"
                             "求める)",
    "sieve.cleartext": "パスワードを平文で送れる: {what}",
    "sieve.refused": "STARTTLS 前は SASL の方式がなく、AUTHENTICATE を拒否する",
    "sieve.why.sasl": "STARTTLS 前に SASL {mechs} を提示",
    "sieve.why.authenticate": "STARTTLS 前の AUTHENTICATE PLAIN にチャレンジで応じた(認証情報を"
                              "平文で求める)",
    "literal.continued": "{service} が {n} オクテットのリテラルに + で応じた: 読み込もうとする",
    "literal.silent": "{service} は 4 GiB のリテラルを拒否も継続もしない: バイト列を待っている"
                      "可能性",
    "literal.wedged": "{service} は 4 GiB のリテラルを拒否したが、その後 NOOP に応答しない",
    "literal.closed": "{service} は 4 GiB のリテラルで接続を切った",
    "literal.dropped": "{service} は 4 GiB のリテラルで BYE なしに接続を切った(セッションが"
                       "異常終了した可能性)",
    "literal.refused": "{service} は 4 GiB のリテラルを + なしで拒否した",
    "imap-line.held": "{service} は {n} オクテットの行の末尾のコマンドに応答した: 行を丸ごと"
                      "保持している",
    "imap-line.refused": "{service} は {n} オクテットのコマンド行を拒否した",
    "imap-line.closed": "{service} は {n} オクテットの行で接続を切った",
    "pop3.cleartext": "パスワードを平文で送れる: {what}",
    "pop3.refused": "STLS 前には USER/PASS も SASL も提示・受理しない",
    "tls.missing": "TLS なし: {where}",
    "tls.everywhere": "{services} で TLS が使える",
    "tls.old-accepted": "受理: {where}",
    "tls.old-refused": "TLS 1.0 と 1.1 は拒否された",
    "tls.old-refused-partly": "TLS 1.0 と 1.1 は拒否された(ここでは試験不能: {untestable})",
    "tls.untestable": "この OpenSSL では {untestable} をどれも提示できない: 試験していない",
    "tls.weak-accepted": "受理: {where}",
    "tls.weak-refused": "弱い暗号は受理されなかった",
    "tls.weak-refused-partly": "弱い暗号は受理されなかった"
                               "(この OpenSSL では試験不能: {untestable})",
    # 上のリスト欄の各部分(registry.part)。UI["list_sep"] で連結する。
    "cert.why.self-signed": "{service}: 自己署名証明書",
    "cert.why.unknown-ca": "{service}: このクライアントが信頼しない認証局(CA)の発行",
    "cert.why.expired-now": "{service}: 証明書の有効期限切れ",
    "cert.why.not-yet-valid": "{service}: 証明書の有効期間がまだ始まっていない",
    "cert.why.name-mismatch": "{service}: 証明書がこのホスト名に対して発行されていない",
    "cert.why.other": "{service}: {reason}",
    "cert.why.expired": "{service}: {date}",
    "cert.why.expires-soon": "{service}: あと {days} 日で期限切れ",
    "tls.why.not-offered": "{service}: 提示されていない",
    "tls.why.stls-not-offered": "{service}: STLS が提示されていない",
    "tls.why.error": "{service}: {error}",
    "pop3.why.capa": "STLS 前の CAPA に {cap}",
    "pop3.why.user-ok": "STLS 前の USER に +OK が返った",
    "cert.expired": "期限切れ: {where}",
    "cert.unverified": "証明書を検証できない: {where}",
    "cert.ok": "証明書は検証でき、期限も近くない",
    "inject.answered": "{services} で STARTTLS/STLS と一緒に送ったコマンドが TLS の中で応答された",
    "inject.discarded": "{services} でハンドシェイク時に平文の先行入力が破棄された",
    "content.accepted": "GTUBE の行を含む {address} 宛てのメールが DATA の終わりで受理された "
                        "({reply}): コンテンツフィルタが拒否しなかった",
    "content.tempfail": "一時エラー: GTUBE 入りのメールに DATA の終わりで {reply} が返った。"
                        "拒否ではない(フィルタに接続できない?)",
    "content.refused": "GTUBE 入りのメールは DATA の終わりで拒否された: {reply}。GTUBE を除いた"
                       "同じメールは受理された",
    "content.control-refused": "GTUBE 入りのメールは拒否された ({reply}) が、GTUBE を除いた同じ"
                               "メールも拒否された ({control}): 内容による拒否ではない",
    "content.odd-reply": "GTUBE 入りのメールへの応答が SMTP の判定ではない: {reply}",
    "content.mail-refused": "MAIL FROM:<> が拒否された ({reply}): メールを送れなかった",
    "content.rcpt-refused": "既知のユーザー {address} が RCPT で拒否された ({reply}): メールを"
                            "送れなかった",
    "content.no-data": "DATA への応答は {reply}: メールを送れなかった",
    "smuggle.answered": "スマグリングしたコマンドに応答があった: {what}",
    "smuggle.one-reply": "{n} 種類のデータ終端の変種に、それぞれ応答は一つだけ",
    "smuggle.no-data": "DATA への応答は {code}",
    "line.silent": "{n} オクテットの行に応答がない(サーバが停止している可能性)",
    "line.closed": "{n} オクテットの行でサーバが接続を切った",
    "line.accepted": "{n} オクテットのコマンド行に {code} が返った: 行を切り捨てた(安全)のか"
                     "全体を保持した(メモリ枯渇)のかは外からは区別できない",
    "line.refused": "{n} オクテットのコマンド行は {code} で拒否された",
    "size.none": "SIZE の上限が提示されていない",
    "size.declared-accepted": "SIZE={limit}+1 の MAIL が受理された",
    "size.declared-refused": "{limit} を超える SIZE の MAIL は拒否された",
    "size.closed": "上限超過のメール({limit}+1 オクテット)でサーバが接続を切った",
    "size.accepted": "上限超過のメール({limit}+1 オクテット)が受理された",
    "size.refused": "宣言・実際の上限超過({limit}+1 オクテット)とも拒否された({code})",
    "rcpt.mail-refused": "MAIL が拒否された({code})",
    "rcpt.all": "{n} 件の宛先がすべて受理された",
    "rcpt.limited": "{n} 件中 {ok} 件の宛先が受理された",
    "nul.closed": "NUL でサーバが接続を切った",
    "nul.accepted": "NUL バイトを含む MAIL が受理された({code})",
    "nul.refused": "NUL バイトを含む MAIL は拒否された({code})",
    "idle.starved": "無言・低速の接続 {n} 本がある間、新しいクライアントに応答がなかった: {error}",
    "idle.served": "無言・低速の接続 {n} 本がある間も、新しいクライアントに {s} 秒で応答した",
    "idle.refused": "無言・低速の接続 {n} 本がある間、新しいクライアントには {code}(上限)",
    "live.dead": "応答なし: {where}",
    "live.ok": "{services} で応答あり",
    "dns.no-domain": "{domain} は名前解決できない",
    "dns.special-use": ("{domain} は公開DNSに存在しない特殊用途の名前"
                        "（それを持つDNSサーバーは --resolver で指定）"),
    "dns.error": "{domain} の DNS エラー: {error}",
    "mx.none": "{domain} に MX レコードがない",
    "mx.null": "{domain} は null MX(メールを受け付けない)",
    "mx.ok": "MX: {hosts}",
    "spf.none": "{domain} に SPF レコードがない",
    "spf.many": "SPF レコードが {n} 件(受信側では恒久的エラー)",
    "spf.pass-all": "SPF がすべてのサーバを許可している: {record}",
    "spf.neutral": "SPF が中立で終わっている: {record}",
    "spf.ok": "SPF: {record}",
    "dmarc.none": "{domain} に DMARC レコードがない",
    "dmarc.many": "{domain} に DMARC レコードが複数ある",
    "dmarc.weak": "DMARC ポリシー p={policy}(監視のみ)",
    "dmarc.ok": "DMARC ポリシー p={policy}",
    "dnsbl.listed": "登録あり: {what}",
    "dnsbl.errors": "どの DNSBL も応答しなかった: {what}",
    "dnsbl.clean": "{ips} は {zones} に登録されていない",
}

UI: dict[str, str] = {
    "yes": "はい",
    "no": "いいえ",
    "list_sep": "、",
    "report": "mailfort 監査",
    "target": "対象",
    "summary": "概要",
    "check": "チェック",
    "status": "判定",
    "result": "結果",
    "evidence": "証拠",
    "why": "なぜ問題か",
    "fix": "対策",
    "postfix": "Postfix の場合",
    "row": "脆弱性の行",
    "no_foreign": "外部ドメイン宛てのメールは一切送らない: 中継の試験は RCPT で止める。",
    "running": "実行中",
}
